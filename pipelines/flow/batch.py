"""The videos of a batch run, as `neodragon generate` and the chain's eval steps make them: one per
(prompt, sample), prompt-major, each from its own seed (`pipeline.sample_seed`), named here."""

from __future__ import annotations

import re

from neodragon_cli.errors import UsageError


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe form of a prompt: lower-case words joined by '-', at most `limit` characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "video"


def batch_video_names(prompts: list[str], num_samples: int, vbench: bool, suffix: str) -> list[str]:
    """File names by (prompt, sample), prompt-major: `<prompt>-<i>` (VBench) or `NNN-<slug>[-<i>]`
    (the sample number only when there are several per prompt)."""
    if vbench:
        bad = next((p for p in prompts if "/" in p or p.startswith(".")), None)
        if bad is not None:
            raise UsageError(f"--vbench-names: the prompt '{bad}' cannot be a file name", hint="drop --vbench-names")
        repeated = next((p for i, p in enumerate(prompts) if p in prompts[:i]), None)
        if repeated is not None:
            raise UsageError(f"--vbench-names: the prompt '{repeated}' is given twice and would write one file", hint="remove the repeat")
        return [f"{p}-{i}{suffix}" for p in prompts for i in range(num_samples)]
    tail = [f"-{i}" for i in range(num_samples)] if num_samples > 1 else [""]
    return [f"{n:03d}-{slug(p)}{t}{suffix}" for n, p in enumerate(prompts) for t in tail]
