"""What `generate` reads and checks before any device work, and what the processes of a job compare.

    prepare(args, writer, identify) -> Prepared      prompts (token ids), tokenizer, model shape / identity
    signature(args, prepared, num_processes) -> dict  the run every process of a job must agree on
    model_identity(path) -> str                       what two processes' --model folders are compared by

`model_identity` is cheap on every host and says whether two folders hold the same model:
- a converted folder: its config and the weights digest stored at conversion (a sha256 over every tensor's
  name, dtype, shape and bytes: docs/errors.md), read from pcp_config.json without reading any tensor;
- an HF folder: its config and a sha256 over config.json, the safetensors index, and for every safetensors
  file its name, size, header (every tensor's name, dtype, shape and offsets) and `WINDOWS` windows of 4 KiB
  at evenly spaced offsets of its data (1 MiB read per file at most). It tells apart different shapes,
  dtypes, layouts, sizes and any two trainings or revisions (they differ everywhere, so in every window); it
  cannot see a change confined to bytes between the windows (one edited tensor smaller than a file's 1/256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from pcp_jax.cli.args import check_tp, read_tokenizer
from pcp_jax.cli.errors import RunError, UsageError, error_line

WINDOWS = 256
_WINDOW = 4096


@dataclasses.dataclass
class Prepared:
    rows: list[list[int]] | None = None   # token ids of each prompt
    tokenizer: object = None              # tokenizers.Tokenizer, or None (ids in, ids out)
    shape: object = None                  # ModelConfig of --preset / --config (None for --model)
    identity: str | None = None           # the model, as compared across processes


def check_sources(args) -> None:
    """Exactly one model source and one kind of prompt; checked before anything else (and before a job forms)."""
    sources = [n for n in ("model", "preset", "config") if getattr(args, n)]
    if len(sources) != 1:
        raise UsageError("give exactly one of --model PATH, --preset NAME or --config JSON"
                         + (f" (got {', '.join('--' + s for s in sources)})" if sources else ""))
    if (args.ids is None) == (args.prompt is None):
        raise UsageError("give exactly one of --prompt TEXT or --ids 1,2,3")
    if (args.chat or args.system is not None) and args.prompt is None:
        raise UsageError("--chat and --system render --prompt messages; give --prompt TEXT instead of --ids")


def prepare(args, writer: bool, identify: bool, into: Prepared | None = None) -> Prepared:
    """What one process checks and reads by itself, in this order: that --model is a folder here (and, with
    `identify`, its identity), the --preset/--config shape, that --tp splits the model, the prompts (with
    their tokenizer and chat template) and that their ids and --top-k fit the vocabulary, and on the process
    that writes (`writer`) the --save folder. Fills `into` step by step (so that a failure leaves what was
    read)."""
    out = into if into is not None else Prepared()
    if args.model:
        if not os.path.isdir(args.model):
            raise UsageError(f"--model={args.model!r} is not a folder on this host")
        if identify:
            try:
                out.identity = model_identity(args.model)
            except (OSError, ValueError) as e:
                raise RunError(f"--model={args.model!r} cannot be loaded: {error_line(e)}") from None
    else:
        out.shape = model_shape(args)
        out.identity = "random weights of config sha256 " + _sha(json.dumps(out.shape.to_dict(), sort_keys=True))[:16]
    cfg = out.shape if out.shape is not None else _readable_config(args.model)
    if cfg is not None:  # else not a model folder: loading it says why
        check_tp(args.tp, cfg=cfg)
    out.rows, out.tokenizer = read_prompts(args)
    if cfg is not None:
        check_vocabulary(out.rows, args.top_k, cfg.vocab_size)
    if writer:
        check_save(args.save)
    return out


def _readable_config(path: str):
    from pcp_jax.loading import model_config
    try:
        return model_config(path)
    except ValueError:
        return None


def check_vocabulary(rows: list[list[int]], top_k: int | None, vocab: int) -> None:
    """Token ids and --top-k within the model's vocabulary, before any device work."""
    for b, row in enumerate(rows):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            raise UsageError(f"token id {bad} in prompt {b} is out of range [0, {vocab}) (the model's vocabulary)")
    if top_k is not None and top_k > vocab:
        raise UsageError(f"--top-k: top_k={top_k} must be in 1..{vocab} (the model's vocabulary)")


def model_shape(args):
    """The ModelConfig of --preset or --config; a name or a file that is not a model shape is a bad flag."""
    from pcp_jax.config import ModelConfig, preset

    if args.preset:
        try:
            return preset(args.preset)
        except ValueError as e:
            raise UsageError(f"--preset: {e}") from None
    try:
        with open(args.config) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"--config={args.config!r} cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config={args.config!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config={args.config!r} holds a JSON {type(data).__name__}; expected an object "
                         f"(an HF config.json or a ModelConfig.to_dict() dump)")
    try:
        return ModelConfig.from_hf(data) if "model_type" in data else ModelConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--config={args.config!r} is not a model shape: {error_line(e)}") from None


def _tokenizer_file(args, required: bool) -> str | None:
    path = args.tokenizer
    if path is None and args.model:
        candidate = os.path.join(args.model, "tokenizer.json")
        path = candidate if os.path.isfile(candidate) else None
    if path is None:
        if required:
            raise UsageError("--prompt needs a tokenizer: put tokenizer.json in the --model folder or pass "
                             "--tokenizer PATH (or give --ids)")
        return None
    if not os.path.isfile(path):
        raise UsageError(f"--tokenizer={path!r} is not a file")
    return path


def read_prompts(args) -> tuple[list[list[int]], object]:
    """(token ids of each prompt, tokenizer or None). --ids come back as ids unless --tokenizer is given;
    with --chat, each --prompt is one user message (after the --system message, if any) rendered with the
    chat template of the tokenizer's folder."""
    if args.ids is not None:
        return args.ids, read_tokenizer(_tokenizer_file(args, required=True)) if args.tokenizer else None
    path = _tokenizer_file(args, required=True)
    tok = read_tokenizer(path)
    if not (args.chat or args.system is not None):
        return [tok.encode(text).ids for text in args.prompt], tok
    from pcp_jax.chat import render
    rows = []
    for text in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": text}]
        try:
            rendered = render(os.path.dirname(os.path.abspath(path)), messages)
        except ValueError as e:
            raise UsageError(f"--chat: {e}") from None
        rows.append(tok.encode(rendered, add_special_tokens=False).ids)
    return rows, tok


def check_save(path: str | None) -> None:
    """--save is written after the whole run: a folder that is missing or read-only must fail before it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--save={path!r} is a folder; expected a file name (an .npz is written there)")
    if not os.path.isdir(folder):
        raise UsageError(f"--save={path!r}: folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--save={path!r}: folder {folder!r} is not writable")


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def model_identity(path: str) -> str:
    """The model a folder holds, as one line (see the module docstring); ValueError if it holds none."""
    from pcp_jax.convert import is_orbax_dir, stored_weights_digest
    from pcp_jax.loading import model_config

    config = _sha(json.dumps(model_config(path).to_dict(), sort_keys=True))[:16]
    if is_orbax_dir(path):
        return f"config {config}, weights {stored_weights_digest(path).hex()[:16]} (digest stored at conversion)"
    return f"config {config}, checkpoint {_checkpoint_sample(path)[:16]} (sampled)"


def _checkpoint_sample(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name not in ("config.json", "model.safetensors.index.json") and not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            if not name.endswith(".safetensors"):
                h.update(f.read())
                continue
            size = os.fstat(f.fileno()).st_size
            header_len = int.from_bytes(f.read(8), "little")
            start = 8 + min(header_len, size)
            h.update(size.to_bytes(8, "little") + f.read(start - 8))
            for k in range(WINDOWS):
                f.seek(start + (size - start) * k // WINDOWS)
                h.update(f.read(_WINDOW))
    return h.hexdigest()


def signature(args, prepared: Prepared, num_processes: int) -> dict:
    """Every setting that decides which programs and collectives run, and on what: compared across the
    processes of a job before any device work, so that a difference fails by name instead of hanging in a
    collective. Paths are not compared, what they hold is: --model by `model_identity`, --config by its shape,
    the prompts by their token ids. --save and --compile-cache are this process's own business."""
    rows = prepared.rows
    prompts = None if rows is None else (
        f"{len(rows)} prompt(s) of {', '.join(str(len(r)) for r in rows)} tokens, sha256 "
        f"{_sha(json.dumps(rows))[:16]}")
    return {"--num-processes": num_processes, "--model/--preset/--config": prepared.identity,
            "--seed": args.seed, "--dtype": args.dtype, "--kernels": args.kernels, "--gdn-strategy": args.gdn_strategy,
            "--cp": args.cp, "--tp": args.tp, "--decode-attention": args.decode_attention,
            "--chunk-size": args.chunk_size, "--cpu-devices": args.cpu_devices, "--cpu-collectives": args.cpu_collectives,
            "--prefix-cache-mb": args.prefix_cache_mb, "--warmup": args.warmup, "--max-new-tokens": args.max_new_tokens,
            "--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p, "--no-eos": not args.eos,
            "the prompts (token ids)": prompts}
