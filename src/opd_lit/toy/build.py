"""Build the toy strong-to-weak pair: tokenizer, supervised training, evaluation, assets.

Both roles are Qwen3 causal LMs initialised at random from ``Qwen3Config`` and trained
on generated step-by-step solutions (loss on the solution tokens and the end-of-turn
token only). Each is saved as a complete local Hugging Face model directory.

CLI::

    python -m opd_lit.toy.build            # rebuild both roles into the cache
    python -m opd_lit.toy.build --ship     # rebuild into src/opd_lit/toy/assets (make toy)
    python -m opd_lit.toy.build --verify   # check the shipped manifest; non-zero on mismatch
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..eval.graders import grade_math
from .cache import (
    ASSETS_DIR,
    MANIFEST_NAME,
    ToyAssetError,
    cache_dir,
    hash_files,
    verify_assets,
    verify_manifest,
)
from .recipe import (
    ROLES,
    ModelParams,
    Recipe,
    TrainParams,
    default_recipe,
    recipe_dict,
    recipe_hash,
)
from .task import format_prompt, make_problems
from .tokenizer import IM_END, PAD_TOKEN, make_hf_tokenizer, train_tokenizer

__all__ = [
    "build_tokenizer",
    "model_config",
    "encode_sft",
    "lr_at",
    "train_model",
    "greedy_generate",
    "greedy_accuracy",
    "build_role",
    "build_all",
    "build_into_cache",
    "ship",
    "make_manifest",
    "main",
]

log = logging.getLogger("opd_lit.toy")


# --------------------------------------------------------------------------- pieces


def build_tokenizer(recipe: Recipe, role: str):
    """The role's Hugging Face tokenizer (shared vocabulary, role-specific chat template)."""
    raw = train_tokenizer(recipe.tokenizer, recipe.task)
    return make_hf_tokenizer(raw, role)


def model_config(mp: ModelParams, tokenizer):
    from transformers import Qwen3Config

    vocab = int(math.ceil(len(tokenizer) / mp.vocab_multiple) * mp.vocab_multiple)
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=mp.hidden_size,
        intermediate_size=mp.intermediate_size,
        num_hidden_layers=mp.num_hidden_layers,
        num_attention_heads=mp.num_attention_heads,
        num_key_value_heads=mp.num_key_value_heads,
        head_dim=mp.head_dim,
        max_position_embeddings=mp.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": mp.rope_theta},
        rms_norm_eps=mp.rms_norm_eps,
        initializer_range=mp.initializer_range,
        tie_word_embeddings=mp.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        use_cache=True,
    )


def generation_config(tokenizer):
    """Samples the plain softmax by default (temperature 1, top_k 0, top_p 1: no
    truncation, unlike transformers' implicit top_k=50); pass ``do_sample=False`` (or a
    GenerationConfig) for greedy. Stops at the end-of-turn token."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )


def prompt_texts(tokenizer, problems: Sequence[dict[str, str]]) -> list[str]:
    return [
        tokenizer.apply_chat_template(format_prompt(p), add_generation_prompt=True, tokenize=False)
        for p in problems
    ]


def encode_sft(tokenizer, problems: Sequence[dict[str, str]]) -> list[tuple[list[int], int]]:
    """(ids, prompt_length) per problem: templated prompt ids + solution ids + end of turn.

    Prompt and solution are tokenized separately and joined, exactly as generation sees
    them (the prompt ends with the assistant header, the model continues from there).
    """
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    prompts = tokenizer(prompt_texts(tokenizer, problems), add_special_tokens=False)["input_ids"]
    sols = tokenizer([p["solution"] for p in problems], add_special_tokens=False)["input_ids"]
    return [(list(p) + list(s) + [eos], len(p)) for p, s in zip(prompts, sols)]


def lr_at(step: int, tp: TrainParams) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if tp.warmup_steps > 0 and step < tp.warmup_steps:
        return tp.lr * (step + 1) / tp.warmup_steps
    span = max(1, tp.steps - tp.warmup_steps)
    progress = min(1.0, (step - tp.warmup_steps) / span)
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))
    return tp.lr * (tp.min_lr_ratio + (1.0 - tp.min_lr_ratio) * cos)


def _batches(examples: list[tuple[list[int], int]], tp: TrainParams) -> Iterator[list[int]]:
    """Batches of example indices; length-bucketed within chunks to cut padding."""
    rng = random.Random(tp.seed)
    chunk = max(1, tp.bucket_batches) * tp.batch_size
    for c0 in range(0, len(examples), chunk):
        idx = list(range(c0, min(c0 + chunk, len(examples))))
        idx.sort(key=lambda i: len(examples[i][0]))
        bs = [idx[i : i + tp.batch_size] for i in range(0, len(idx), tp.batch_size)]
        rng.shuffle(bs)
        yield from bs


def _collate(examples, batch: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    for r, i in enumerate(batch):
        seq, n_prompt = examples[i]
        t = torch.tensor(seq, dtype=torch.long)
        ids[r, : len(seq)] = t
        labels[r, n_prompt : len(seq)] = t[n_prompt:]
    return ids, labels


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as prog:
        yield prog


def train_model(
    model,
    tokenizer,
    problems: Sequence[dict[str, str]],
    tp: TrainParams,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Supervised training on ``problems`` (``tp.steps * tp.batch_size`` of them)."""
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    examples = encode_sft(tokenizer, problems)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tp.lr,
        betas=(tp.beta1, tp.beta2),
    )
    model.train()
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    batches = _batches(examples, tp)
    with _progress(progress) as prog:
        task = prog.add_task(desc, total=tp.steps, info="") if prog else None
        for step in range(tp.steps):
            batch = next(batches)
            ids, labels = _collate(examples, batch, pad_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tp)
            # Right padding + causal attention: real tokens never see the pads, so no
            # attention mask is needed (and SDPA takes its fast causal path).
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if prog is not None:
                recent = losses[-20:]
                prog.update(task, advance=1, info=f"loss {sum(recent) / len(recent):.4f}")
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return {
        "train_seconds": round(time.perf_counter() - t0, 2),
        "train_cpu_seconds": round(time.process_time() - c0, 2),  # all threads
        "steps": tp.steps,
        "final_loss": round(sum(tail) / len(tail), 5),
    }


@torch.inference_mode()
def greedy_generate(
    model, tokenizer, problems: Sequence[dict[str, str]], batch_size: int = 64, max_new_tokens: int = 96
) -> list[str]:
    """Greedy responses (decoded, special tokens skipped) with left-padded batches."""
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        texts = prompt_texts(tokenizer, problems)
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def greedy_accuracy(
    model, tokenizer, problems: Sequence[dict[str, str]], batch_size: int = 64, max_new_tokens: int = 96
) -> float:
    """Share of ``problems`` whose greedy response's boxed answer equals the gold answer."""
    if not problems:
        return 0.0
    responses = greedy_generate(model, tokenizer, problems, batch_size, max_new_tokens)
    return sum(grade_math(r, p["answer"]) for r, p in zip(responses, problems)) / len(problems)


# --------------------------------------------------------------------------- building


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "python_version": sys.version.split()[0],
    }


def build_role(
    role: str,
    out_dir: str | Path,
    recipe: Recipe | None = None,
    evaluate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the role from scratch and save it to ``out_dir`` (a complete HF model dir).

    Returns a record: train_seconds, steps, final_loss, num_parameters, vocab_size and,
    if ``evaluate``, greedy ``accuracy`` on the recipe's held-out problems.
    """
    from transformers import Qwen3ForCausalLM

    recipe = recipe if recipe is not None else default_recipe()
    if role not in ROLES:
        raise ValueError(f"unknown toy role {role!r}; allowed roles: {', '.join(ROLES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mp, tp = recipe.model(role), recipe.train(role)

    tokenizer = build_tokenizer(recipe, role)
    config = model_config(mp, tokenizer)
    torch.manual_seed(tp.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = generation_config(tokenizer)
    # both check-line wordings, so one pair of models serves data.check_wording=free|fixed
    problems = make_problems("train", tp.steps * tp.batch_size, tp.data_seed, recipe.task, wording="mixed")
    record: dict[str, Any] = {
        "role": role,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "torch_threads": torch.get_num_threads(),
    }
    record.update(train_model(model, tokenizer, problems, tp, progress, desc=f"toy {role}"))
    if evaluate:
        t0 = time.perf_counter()
        evals = make_problems("eval", recipe.eval_problems, recipe.eval_problem_seed, recipe.task)
        record["accuracy"] = greedy_accuracy(
            model, tokenizer, evals, max_new_tokens=recipe.eval_max_new_tokens
        )
        record["eval_problems"] = len(evals)
        record["eval_seconds"] = round(time.perf_counter() - t0, 2)
        log.info("toy %s: greedy accuracy %.4f on %d held-out problems", role, record["accuracy"], len(evals))
    _save_quietly(model, tokenizer, out_dir)
    return record


def _save_quietly(model, tokenizer, out_dir: Path) -> None:
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    for p in out_dir.iterdir():  # save_pretrained may create 0600 files
        if p.is_file():
            p.chmod(0o644)


def make_manifest(root: Path, recipe: Recipe, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    files: dict[str, str] = {}
    for role in records:
        files.update(hash_files(root, role))
    m: dict[str, Any] = {
        "recipe_version": recipe.version,
        "recipe_hash": recipe_hash(recipe),
        "recipe": recipe_dict(recipe),
        "files": dict(sorted(files.items())),
    }
    for role, rec in records.items():
        m[f"{role}_accuracy"] = rec.get("accuracy")
    m["train_seconds"] = {role: rec["train_seconds"] for role, rec in records.items()}
    m["roles"] = records
    m.update(_versions())
    m["created_unix"] = int(time.time())
    return m


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def build_all(
    out_root: str | Path,
    recipe: Recipe | None = None,
    roles: Sequence[str] = ROLES,
    evaluate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build ``roles`` into ``out_root/<role>`` and write ``out_root/manifest.json``."""
    recipe = recipe if recipe is not None else default_recipe()
    out_root = Path(out_root)
    records = {}
    for role in roles:
        if (out_root / role).exists():
            shutil.rmtree(out_root / role)
        records[role] = build_role(role, out_root / role, recipe, evaluate, progress)
    manifest = make_manifest(out_root, recipe, records)
    _write_json(out_root / MANIFEST_NAME, manifest)
    return manifest


def build_into_cache(role: str, recipe: Recipe | None = None, progress: bool = True) -> Path:
    """(Re)build ``role`` into ``$OPD_LIT_CACHE/toy/<recipe_hash>/<role>`` (locked, atomic)."""
    recipe = recipe if recipe is not None else default_recipe()
    root = cache_dir(recipe)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{role}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have finished the build while we waited.
            manifest_path = root / f"{role}.manifest.json"
            if manifest_path.is_file():
                try:
                    verify_manifest(root, json.loads(manifest_path.read_text()), [role], recipe)
                    return root / role
                except (ToyAssetError, json.JSONDecodeError):
                    pass
            # Holding the lock, no other build of this role is alive: leftovers of
            # interrupted builds can go.
            for old in root.glob(f".stage-{role}-*"):
                shutil.rmtree(old, ignore_errors=True)
            stage = root / f".stage-{role}-{os.getpid()}"
            record = build_role(role, stage / role, recipe, evaluate=True, progress=progress)
            manifest_path.unlink(missing_ok=True)
            if (root / role).exists():
                shutil.rmtree(root / role)
            os.replace(stage / role, root / role)
            shutil.rmtree(stage, ignore_errors=True)
            _write_json(manifest_path, make_manifest(root, recipe, {role: record}))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root / role


def ship(recipe: Recipe | None = None, assets_dir: Path = ASSETS_DIR, progress: bool = True) -> dict[str, Any]:
    """Rebuild both roles and replace the shipped assets directory with the result."""
    assets_dir = Path(assets_dir)
    stage = assets_dir.with_name(assets_dir.name + f".stage-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    # the student first: it is the quick one, and its accuracy is the one to look at
    manifest = build_all(stage, recipe, ("student", "teacher"), evaluate=True, progress=progress)
    verify_assets(stage, ROLES, recipe)
    if assets_dir.exists():
        shutil.rmtree(assets_dir)
    os.replace(stage, assets_dir)
    return manifest


def _summary(manifest: dict[str, Any]) -> str:
    lines = [f"recipe {manifest.get('recipe_hash')} ({manifest.get('recipe_version')})"]
    for role in ROLES:
        rec = (manifest.get("roles") or {}).get(role)
        if rec is None:
            continue
        acc = rec.get("accuracy")
        acc_s = "n/a" if acc is None else f"{100 * acc:.1f}%"
        lines.append(
            f"  {role}: greedy accuracy {acc_s} on {rec.get('eval_problems', '?')} held-out problems, "
            f"{rec.get('num_parameters')} params, trained {rec.get('train_seconds')} s "
            f"({rec.get('steps')} steps, final loss {rec.get('final_loss')})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opd_lit.toy.build", description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--ship", action="store_true", help="rebuild into src/opd_lit/toy/assets")
    mode.add_argument("--verify", action="store_true", help="verify the shipped assets")
    ap.add_argument("--role", choices=ROLES, action="append", help="only this role (cache build)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.verify:
        try:
            manifest = verify_assets(ASSETS_DIR)
        except ToyAssetError as e:
            print(f"toy assets FAILED verification: {e}", file=sys.stderr)
            return 1
        print(f"toy assets OK in {ASSETS_DIR}\n{_summary(manifest)}")
        return 0
    if args.ship:
        t0 = time.perf_counter()
        manifest = ship(progress=not args.no_progress)
        print(f"shipped toy assets to {ASSETS_DIR} in {time.perf_counter() - t0:.0f} s\n{_summary(manifest)}")
        return 0
    roles = args.role or list(ROLES)
    for role in roles:
        root = cache_dir()
        (root / f"{role}.manifest.json").unlink(missing_ok=True)  # force a rebuild
        path = build_into_cache(role, progress=not args.no_progress)
        manifest = json.loads((root / f"{role}.manifest.json").read_text())
        print(f"built toy {role} into {path}\n{_summary(manifest)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
