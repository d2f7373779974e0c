"""``hc-retrofit push DIR REPO_ID``: upload a converted checkpoint (with a generated model card) to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hc_retrofit.cli.core import app, console, err_console


@app.command("push")
def push_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A converted checkpoint directory.")],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="Hub repository, OWNER/NAME (created if it does not exist).")
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if needed).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Send nothing; print what would be uploaded, and the model card.")
    ] = False,
    allow_modified_code: Annotated[
        bool,
        typer.Option(
            "--allow-modified-code",
            help="Publish even if DIR holds code hc-retrofit did not write (edited modeling files, other .py "
            "files, auto_map entries pointing elsewhere); the differences are listed.",
        ),
    ] = False,
    license: Annotated[
        str | None, typer.Option("--license", help="License id for the card (default: the base model's).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Hub id of the base for the card (default: the recorded one).")
    ] = None,
) -> None:
    """Upload DIR to the Hugging Face Hub (HF_ENDPOINT) with a generated README.md model card.

    Needs a token with write access (`hf auth login` or HF_TOKEN). A README.md you wrote yourself is kept.
    Local paths are cut from every text file uploaded; code hc-retrofit did not write is refused.
    """
    with err_console.status(f"uploading to {repo_id}", spinner="dots") if not dry_run else _nothing():
        from hc_retrofit.hub import push_checkpoint

        plan = push_checkpoint(
            directory,
            repo_id,
            private=private,
            revision=revision,
            dry_run=dry_run,
            allow_modified_code=allow_modified_code,
            license=license,
            base_model=base_model,
        )
    where = f"{plan.endpoint}/{plan.repo_id}" + (f" (branch {plan.revision})" if plan.revision else "")
    card = "README.md model card: " + ("generated" if plan.card_generated else "yours, kept")
    if plan.code_problems:
        verdict = "published anyway (--allow-modified-code)" if allow_modified_code else "a real push is refused"
        err_console.print(f"code hc-retrofit did not write ({verdict}):", markup=False)
        for problem in plan.code_problems:
            err_console.print(f"  - {problem}", markup=False, highlight=False)
    if plan.local_paths:
        console.print(f"local paths cut from the upload ({len(plan.local_paths)}):")
        for name, found in plan.local_paths:
            console.print(f"  {name}: {found}", markup=False, highlight=False)
    if dry_run:
        console.print(f"dry run: would upload {len(plan.files)} files to {where}{' as private' if private else ''}")
        for name in plan.files:
            console.print(f"  {name}", markup=False, highlight=False)
        console.print(card)
        console.print("the model card it would upload as README.md (indented here):")
        for line in (plan.card or "").splitlines():  # indented: the card's own code fences stay inside
            console.print(f"    {line}".rstrip(), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(
            f"uploaded {len(plan.files)} files to {plan.url or where}"
            + (f" (commit {plan.commit})" if plan.commit else "")
        )
        console.print(card)
    for note in plan.notes:
        err_console.print(f"note: {note}")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
