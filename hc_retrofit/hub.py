"""Publishing converted checkpoints on the Hugging Face Hub: ``push_checkpoint``, one checked commit.

:func:`push_checkpoint` checks the code a ``trust_remote_code`` user would run
(:mod:`hc_retrofit.code_check`), creates the repository (``create_repo``) and the branch if one
is asked for, and uploads the folder in one commit (``create_commit``): its files as they are,
except text files with a local path in them (cut, :mod:`hc_retrofit.push_files`) and the
generated ``README.md`` model card (:mod:`hc_retrofit.model_card`; unless the user wrote their
own), which are sent from memory: the folder itself is never written. ``dry_run`` sends no
request and returns the plan, card included. The endpoint is huggingface_hub's (``HF_ENDPOINT``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hc_retrofit.card_metadata import card_metadata
from hc_retrofit.checkpoint_format import require_converted_dir
from hc_retrofit.model_card import CARD_FILE, card_is_ours, model_card
from hc_retrofit.modeling.errors import HubError
from hc_retrofit.push_files import files_to_upload, publishable_files
from hc_retrofit.repo_ids import is_valid_repo_id


@dataclass
class PushPlan:
    """What a push uploads (``dry_run``) or uploaded."""

    repo_id: str
    folder: str
    files: list[str]
    card_generated: bool
    private: bool
    revision: str | None
    endpoint: str
    url: str | None = None
    commit: str | None = None
    notes: list[str] = field(default_factory=list)
    card: str | None = None
    """The model card uploaded as README.md (generated, or the user's own, paths cut)."""
    local_paths: list[tuple[str, str]] = field(default_factory=list)
    """``(file, string)``: every local path cut out of what is uploaded."""
    code_problems: list[str] = field(default_factory=list)
    """How the code a ``trust_remote_code`` user would run differs from what hc-retrofit writes."""


def push_checkpoint(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    allow_modified_code: bool = False,
    license: str | None = None,
    base_model: str | None = None,
) -> PushPlan:
    """Upload converted checkpoint ``path`` to Hub repository ``repo_id`` (created if needed).

    What is uploaded: the folder's files, with every local path cut from its text files
    (:mod:`hc_retrofit.local_paths`), and the model card (generated unless the user wrote one).
    The code a ``trust_remote_code`` user would run is checked first
    (:func:`hc_retrofit.code_check.code_problems`); any difference refuses the push unless
    ``allow_modified_code``. ``dry_run`` sends nothing and returns the plan (card included).

    Raises:
        NotConvertedError: ``path`` is not a converted checkpoint.
        HubError: modified code, no token, or the Hub refused or could not be reached.
    """
    from huggingface_hub import constants, get_token

    from hc_retrofit.code_check import code_problems

    path = Path(path)
    require_converted_dir(path, "push only what hc-retrofit convert wrote")
    if not is_valid_repo_id(repo_id or ""):
        raise HubError(f"repository id {repo_id!r} must look like OWNER/NAME (or NAME): letters, digits, '-', '_', '.'")
    token = token or get_token()
    regenerate = card_is_ours(path)
    files = files_to_upload(path)
    if regenerate and CARD_FILE not in files:
        files = sorted([*files, CARD_FILE])
    plan = PushPlan(repo_id, str(path), files, regenerate, private, revision, constants.ENDPOINT)
    plan.code_problems = code_problems(path)
    if plan.code_problems and not (allow_modified_code or dry_run):
        more = f" and {len(plan.code_problems) - 1} more" if len(plan.code_problems) > 1 else ""
        raise HubError(
            f"{path} holds code hc-retrofit did not write ({plan.code_problems[0]}{more}); push refuses to publish "
            "what trust_remote_code users would run: see `hc-retrofit push --dry-run` for the list, remove it, or "
            "pass --allow-modified-code"
        )
    generated, plan.local_paths = publishable_files(path, [f for f in files if f != CARD_FILE or not regenerate])
    if regenerate:
        meta = card_metadata(path, license, base_model)
        generated[CARD_FILE] = model_card(path, repo_id, license=license, base_model=base_model).encode("utf-8")
        for key, flag in (("license", "--license"), ("base_model", "--base-model")):
            if key not in meta:
                plan.notes.append(
                    f"the model card has no {key}: the base model's own card does not state one here; pass {flag}"
                )
    plan.card = (generated.get(CARD_FILE) or (path / CARD_FILE).read_bytes()).decode("utf-8", errors="replace")
    if not token:
        if not dry_run:
            raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
        plan.notes.append("no Hugging Face token found: a real push would fail (run `hf auth login` or set HF_TOKEN)")
    if dry_run:
        return plan
    return _upload(plan, token, generated)  # from memory: the user's directory is not written


def _upload(plan: PushPlan, token: str, generated: dict[str, bytes]) -> PushPlan:
    """One commit: the checkpoint's files as they are, ``generated`` files (card, public config) from memory."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        # private=None keeps the owner's default visibility (an organisation may default to private)
        url = api.create_repo(plan.repo_id, private=True if plan.private else None, exist_ok=True, repo_type="model")
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=generated.get(name, str(Path(plan.folder) / name)))
            for name in plan.files
        ]
        info = api.create_commit(
            repo_id=plan.repo_id,
            operations=operations,
            revision=plan.revision,
            commit_message="Upload hyper-connection checkpoint (hc-retrofit)",
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = {401: "the token was rejected; run `hf auth login`", 403: "the token may not write to this repository"}
        raise HubError(
            f"the Hub refused the upload to {plan.repo_id} ({status}): {hint.get(status, str(err).splitlines()[0])}"
        ) from err
    except ValueError as err:  # a 200 that is not the Hub's JSON (a proxy's page, a wrong HF_ENDPOINT)
        raise HubError(
            f"the server at {plan.endpoint} did not answer like the Hugging Face Hub (no JSON: {_first_line(err)}); "
            "check HF_ENDPOINT"
        ) from err
    except Exception as err:  # connection refused, DNS, timeouts: httpx errors, not OSErrors
        if isinstance(err, OSError) or type(err).__module__.startswith(("httpx", "httpcore", "requests")):
            raise HubError(f"cannot reach the Hub at {plan.endpoint}: {type(err).__name__}: {err}") from err
        raise
    plan.url = str(url)
    plan.commit = getattr(info, "oid", None)
    return plan


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:120] if lines else type(err).__name__
