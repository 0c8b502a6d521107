"""`sega-jax sweep status OUT` and `sega-jax sweep sheets OUT`: a sweep's progress, read from its stored spec
and manifests alone (no model, no JAX), and its contact sheets (re)drawn.

Both exit with 0 when every image is done, 1 when some are still to do, 2 for a bad OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping

from sega_jax.sweep.files import complete_prompts, union, write_contact_sheets
from sega_jax.sweep.spec import DEFAULTS, SPEC_FILE, SpecError, SweepSpec, expand_settings, groups, items
from sega_jax.sweep.store import Store, open_store, part_shard

COMMANDS = ("status", "sheets")


def stored_spec(url: str) -> tuple[SweepSpec, Store]:
    """The spec stored with the sweep at `url` (not validated again: it was when the sweep started)."""
    store = open_store(url, "OUT")
    if not store.exists(SPEC_FILE):
        raise SpecError(f"OUT: {url} holds no sweep (no {SPEC_FILE})")
    try:
        values = {**DEFAULTS, **json.loads(store.read(SPEC_FILE)), "output": url}
    except ValueError as err:
        raise SpecError(f"OUT: {url}/{SPEC_FILE} is not valid JSON: {err}") from err
    return SweepSpec(values, tuple(expand_settings(values)), ()), store


def _batch_per_device(parts: Mapping[str, list[dict]], count: int) -> int | None:
    """The work-group size the workers of an N=`count` split used, as their records tell (None if untold)."""
    sizes = Counter(
        record["batch_per_device"]
        for name, records in parts.items()
        if (part_shard(name) or (0, 0))[1] == count
        for record in records
        if "batch_per_device" in record
    )
    return sizes.most_common(1)[0][0] if sizes else None


def shard_lines(spec: SweepSpec, parts: Mapping[str, list[dict]], done: set[str]) -> list[str]:
    """Per shard of every split found among the manifest parts: done / to do of its share, and how many
    records its own manifest part(s) hold."""
    lines = []
    all_items = items(spec)
    for count in sorted({shard[1] for shard in map(part_shard, parts) if shard}):
        size = _batch_per_device(parts, count)
        for index in range(count):
            own = sum(len(records) for name, records in parts.items() if part_shard(name) == (index, count))
            line = f"  shard {index}/{count}: "
            if size is not None:
                mine = groups(all_items, size, spec.settings)[index::count]
                share = [item for group in mine for item in group]
                finished = sum(item.file in done for item in share)
                line += f"{finished} done, {len(share) - finished} to do; "
            lines.append(line + f"{own} records in its manifest part")
    return lines


def status_lines(spec: SweepSpec, parts: Mapping[str, list[dict]]) -> list[str]:
    """The report of `sega-jax sweep status`: totals, per prompt, per shard."""
    all_items = items(spec)
    done = {record["file"] for record in union(parts)}
    finished = sum(item.file in done for item in all_items)
    lines = [f"{spec.output}: {len(all_items)} images, {finished} done, {len(all_items) - finished} to do"]
    for prompt, text in enumerate(spec.prompts):
        mine = [item for item in all_items if item.prompt == prompt]
        count = sum(item.file in done for item in mine)
        lines.append(f"  prompt {prompt} {text!r}: {count} done, {len(mine) - count} to do")
    return lines + shard_lines(spec, parts, done)


def _status(spec: SweepSpec, store: Store) -> int:
    parts = store.manifest_parts()
    print("\n".join(status_lines(spec, parts)))
    done = {record["file"] for record in union(parts)}
    return 0 if all(item.file in done for item in items(spec)) else 1


def _sheets(spec: SweepSpec, store: Store) -> int:
    for name in write_contact_sheets(spec, store, tag="sheets", redraw=True):
        print(f"wrote {spec.output.rstrip('/')}/{name}")
    done = {record["file"] for record in union(store.manifest_parts())}
    incomplete = sorted(set(range(len(spec.prompts))) - set(complete_prompts(spec, done)))
    if incomplete:
        print(f"sega-jax sweep sheets: no sheet yet for prompt(s) {incomplete}: images still to do "
              "(see sega-jax sweep status)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """`sega-jax sweep status OUT` / `sega-jax sweep sheets OUT` (argv starts with the command)."""
    command, rest = argv[0], argv[1:]
    about = {
        "status": "print done / to do per prompt and per shard, from the stored spec and manifests alone",
        "sheets": "(re)draw the contact sheet of every prompt whose images are all done",
    }[command]
    parser = argparse.ArgumentParser(
        prog=f"sega-jax sweep {command}",
        description=f"{about}. Exit status: 0 all done, 1 images still to do, 2 bad OUT.",
    )
    parser.add_argument("out", metavar="OUT", help="the sweep's output folder or URL (its --out)")
    args = parser.parse_args(rest)
    try:
        spec, store = stored_spec(args.out)
        return _status(spec, store) if command == "status" else _sheets(spec, store)
    except SpecError as err:
        print(f"sega-jax sweep {command}: error: {err}", file=sys.stderr)
        return 2
