"""k2jax-convert HF_DIR OUT_DIR: a Hugging Face checkpoint -> a k2jax orbax checkpoint (+ config, tokenizer)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkpoints.orbax_io import save_orbax
from k2jax.cliargs import Parser, mesh_spec
from k2jax.config import K2Config
from k2jax.loading import load_state, make_mesh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments; a malformed one exits with code 2 and one line naming it."""
    ap = Parser(prog="k2jax-convert", description=__doc__)
    ap.add_argument("hf_dir", type=Path, help="Hugging Face checkpoint directory (config.json + safetensors)")
    ap.add_argument("out_dir", type=Path, help="output directory for the orbax checkpoint")
    ap.add_argument("--mesh", type=mesh_spec, default=None, help='device mesh to stage on, e.g. "expert=8" (default: '
                    'all local devices); the output restores onto any mesh')
    return ap.parse_args(argv)


def convert(hf_dir: Path, out_dir: Path, mesh: str | None = None) -> None:
    """Stream the HF checkpoint onto the mesh, then write it as orbax with config.json and tokenizer files."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output directory exists and is not empty")
    cfg = K2Config.from_json(hf_dir)
    _, state = load_state(hf_dir, cfg, make_mesh(mesh), progress=True)
    save_orbax(out_dir, cfg, state, tokenizer_dir=hf_dir)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2 for a bad checkpoint or arguments)."""
    args = parse_args(argv)
    try:
        convert(args.hf_dir, args.out_dir, args.mesh)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # CheckpointError, ConfigError are ValueErrors
        print(f"k2jax-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"k2jax-convert: wrote {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
