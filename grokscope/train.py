"""Trains the small models bundled in `grokscope/assets/`: grok-tiny (Grok-1's architecture)
and grok2-tiny (Grok-2's: a dense MLP beside the experts, soft-capped router and logits).

Routing analysis on random weights shows nothing; this module trains a small model with the
project's own forward (`make_forward`, float32) whose experts specialize, and bundles it the
way the real release is laid out, with a config, a tokenizer, held-out example prompts, the
corpus manifest, measured metrics and a model card:

  --arch grok1  `ckpt-0/` with int8 `QuantizedWeight8bit` weights (`save_params`), a flat
                config.json, a SentencePiece `tokenizer.model`.
  --arch grok2  bf16 safetensors in the Grok-2 release's TP=8 layout (`save_release`), a
                Hugging Face config.json, xAI's `tokenizer.tok.json` (byte-level BPE).

Run (every default is the shipped model's setting):

    grokscope train-tiny [--arch grok1|grok2] [--out DIR] [--steps N] [--seed 0] [--batch 16]

Objective (per training batch of non-pad next-token targets):

    loss = CE + sum over layers of (BALANCE_COEF * E * sum_e f_e P_e + Z_LOSS_COEF * mean_t lse_t^2)

  - CE: mean next-token cross-entropy (nats) over targets that are not the pad id.
  - Switch load-balancing loss per layer (Switch Transformer, arXiv 2101.03961, eqs. 4-6) in
    its top-k form: f_e = share of the layer's top-k assignments that went to expert e (from
    the recorded `expert_index`, no gradient) and P_e = mean router probability of e (softmax
    of the recorded `router_logits`). BALANCE_COEF = 1e-2; the term is 1e-2 at uniform routing.
  - Router z-loss per layer (ST-MoE, arXiv 2202.08906, sec. 3): mean over tokens of
    logsumexp(router_logits)^2, Z_LOSS_COEF = 1e-3.
  Both routing terms average over non-pad input tokens.

Optimizer: optax AdamW (b1 0.9, b2 0.95, weight decay 0.1 on weight matrices other than the
embedding), global-norm clipping at 1.0, linear warmup then cosine decay to 10% of the peak.

Initialization: `init_params(config, seed, quantized=False)`, then the embedding table (and
the untied output table, if any) is scaled by 1/sqrt(emb_size) so that, after the input
multiplier sqrt(emb_size), the residual stream starts at unit RMS (the releases pair their
multiplier with a small table).

Everything is deterministic from `--seed`: parameters from `jax.random.PRNGKey(seed)`, batches
from `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grokscope import corpus
from grokscope.config import GROK2_TINY, GROK_TINY, ModelConfig
from grokscope.session import bundled_model_dir, default_model_dir
from grokscope.forward import init_params, make_forward
from grokscope.record import RecordSpec

__all__ = ["GROK_TINY", "BALANCE_COEF", "Z_LOSS_COEF", "ASSET_DIR", "TrainSettings", "routing_losses",
           "lm_loss", "EvalResult", "evaluate", "heldout_loss", "routing_summary", "load_bundled",
           "example_windows", "main"]

ASSET_DIR = default_model_dir()
"""Where the bundled default model lives."""

ARCHS: dict[str, tuple[ModelConfig, str]] = {"grok1": (GROK_TINY, "grok-tiny"), "grok2": (GROK2_TINY, "grok2-tiny")}
"""`--arch`: the bundled model's config and name."""

BALANCE_COEF = 1e-2
"""Switch load-balancing coefficient alpha, applied to every layer."""

Z_LOSS_COEF = 1e-3
"""Router z-loss coefficient c_z, applied to every layer."""

SIZE_BUDGET_BYTES = 10 * 1000 * 1000

@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What the training run does besides the model config (defaults: the shipped run)."""

    steps: int = 600
    batch: int = 16
    seq_len: int = 256
    seed: int = 0
    peak_lr: float = 3e-3
    warmup_steps: int = 30
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    prose_rows: int = 4
    eval_tokens: int = 65536
    eval_every: int = 200
    log_every: int = 10


# ---------------------------------------------------------------------------------------------
# Losses


def routing_losses(router_logits: jax.Array, expert_index: jax.Array, valid: jax.Array,
                   num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per-layer Switch load-balancing loss (without alpha) and router z-loss (without c_z).

    Args:
      router_logits: [B, T, L, E] float32, as recorded.
      expert_index: [B, T, L, k] int32, as recorded.
      valid: [B, T] bool, the tokens to average over (non-pad inputs).
      num_experts: E.

    Returns:
      (balance [L], z [L]): balance = E * sum_e f_e P_e, with f_e the share of top-k
      assignments to e and P_e the mean router probability of e; z = mean logsumexp^2.
    """
    w = valid.astype(jnp.float32)[:, :, None]  # [B, T, 1]
    n = jnp.maximum(w.sum(), 1.0)
    probs = jax.nn.softmax(router_logits, axis=-1)  # [B, T, L, E]
    k = expert_index.shape[-1]
    assigned = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32).sum(axis=-2)  # [B, T, L, E]
    f = jax.lax.stop_gradient((assigned * w[..., None]).sum(axis=(0, 1)) / (k * n))  # [L, E]
    p = (probs * w[..., None]).sum(axis=(0, 1)) / n  # [L, E]
    balance = num_experts * (f * p).sum(axis=-1)  # [L]
    lse = jax.nn.logsumexp(router_logits, axis=-1)  # [B, T, L]
    z = (jnp.square(lse) * w).sum(axis=(0, 1)) / n  # [L]
    return balance, z


def lm_loss(apply: Callable, config: ModelConfig, params: Any, tokens: jax.Array):
    """The training objective on `tokens` [B, T+1]; returns (loss, aux dict of scalars/[L])."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits, record = apply(params, inputs, positions)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    target_mask = (targets != config.pad_token).astype(jnp.float32)
    ce = (nll * target_mask).sum() / jnp.maximum(target_mask.sum(), 1.0)
    balance, z = routing_losses(record["router_logits"], record["expert_index"],
                                inputs != config.pad_token, config.num_experts)
    loss = ce + BALANCE_COEF * balance.sum() + Z_LOSS_COEF * z.sum()
    return loss, {"ce": ce, "balance": balance, "z": z}


def _make_optimizer(settings: TrainSettings):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.peak_lr,
        warmup_steps=min(settings.warmup_steps, settings.steps // 2),
        decay_steps=settings.steps, end_value=settings.peak_lr * settings.end_lr_fraction)

    def decay_mask(params):
        return {module: {name: (v.ndim >= 2 and name != "embeddings") for name, v in values.items()}
                for module, values in params.items()}

    opt = optax.chain(
        optax.clip_by_global_norm(settings.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=settings.weight_decay,
                    mask=decay_mask))
    return opt, schedule


def _initial_params(config: ModelConfig, seed: int) -> dict:
    params = init_params(config, seed, quantized=False)
    for module in ("language_model/in_out_embed", "language_model/unembed"):
        if module in params:
            table = params[module]
            table["embeddings"] = np.asarray(table["embeddings"]) / math.sqrt(config.emb_size)
    return jax.tree.map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------
# Data


def _domain_streams(sequences: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {domain: np.concatenate(seqs) for domain, seqs in sequences.items()}


def _sample_batch(rng: np.random.Generator, streams: dict[str, np.ndarray], settings: TrainSettings) -> np.ndarray:
    """`prose_rows` prose rows then code rows, each a random window of seq_len + 1 ids."""
    rows = []
    for domain, n in (("prose", settings.prose_rows), ("code", settings.batch - settings.prose_rows)):
        stream = streams[domain]
        starts = rng.integers(0, len(stream) - settings.seq_len - 1, size=n)
        rows.extend(stream[s:s + settings.seq_len + 1] for s in starts)
    return np.stack(rows).astype(np.int32)


def example_windows(examples: Sequence[dict], tokenizer, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Example prompts as `[bos] + ids` rows (no bos for a tokenizer without one), pad-filled to a
    common length; and their labels.

    Returns:
      (tokens int32 [N, S], labels [N] of "code"/"prose").
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = [[*bos, *tokenizer.encode(e["text"])] for e in examples]
    length = max(len(x) for x in ids)
    length += (-length) % multiple
    out = np.zeros((len(ids), length), dtype=np.int32)
    for row, x in zip(out, ids):
        row[:len(x)] = x
    return out, np.asarray([e["label"] for e in examples])


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class EvalResult:
    """Per-token outputs of the model on windows [N, S] (numpy).

    Attributes:
      tokens: [N, S] input ids.
      nll: [N, S-1] negative log-likelihood of tokens[:, 1:] (nats).
      expert_index: [N, S, L, k] top-k experts per input token.
      entropy: [N, S, L] router entropy in nats.
      pad_token: the pad id (masked out of every statistic).
    """

    tokens: np.ndarray
    nll: np.ndarray
    expert_index: np.ndarray
    entropy: np.ndarray
    pad_token: int

    @property
    def valid(self) -> np.ndarray:
        """[N, S] non-pad input tokens."""
        return self.tokens != self.pad_token

    @property
    def target_mask(self) -> np.ndarray:
        """[N, S-1] non-pad targets."""
        return self.tokens[:, 1:] != self.pad_token

    def select(self, rows: np.ndarray) -> "EvalResult":
        return EvalResult(self.tokens[rows], self.nll[rows], self.expert_index[rows],
                          self.entropy[rows], self.pad_token)


def evaluate(params: Any, config: ModelConfig, windows: np.ndarray, batch: int = 32) -> EvalResult:
    """Runs the model (float32 compute) over `windows` [N, S] in fixed-size batches, through
    `grokscope.runner` (next-token log-probabilities reduced on the device)."""
    from grokscope.runner import Model, run

    model = Model(config, params)
    windows = np.asarray(windows, dtype=np.int32)
    n = len(windows)
    pad_rows = (-n) % batch
    padded = np.concatenate([windows, np.full((pad_rows, windows.shape[1]), config.pad_token, np.int32)])
    nll, index, entropy = [], [], []
    for i in range(0, len(padded), batch):
        record, outputs = jax.device_get(run(model, padded[i:i + batch], RecordSpec(routing=True),
                                             outputs=("token_logprob",)))
        nll.append(-outputs["token_logprob"][:, :-1])
        index.append(record["expert_index"])
        logits = record["router_logits"]
        logq = logits - logits.max(-1, keepdims=True)
        logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
        entropy.append(-(np.exp(logq) * logq).sum(-1))
    return EvalResult(windows, np.concatenate(nll)[:n], np.concatenate(index)[:n], np.concatenate(entropy)[:n],
                      config.pad_token)


def heldout_loss(result: EvalResult) -> float:
    """Mean nll (nats/token) over non-pad targets."""
    mask = result.target_mask
    return float((result.nll * mask).sum() / mask.sum())


def _load(index: np.ndarray, valid: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of top-k assignments per expert: [L, E] (rows sum to 1)."""
    sel = index[valid]  # [n, L, k]
    counts = np.stack([np.bincount(sel[:, layer].ravel(), minlength=num_experts)
                       for layer in range(sel.shape[1])])
    return counts / counts.sum(axis=1, keepdims=True)


def _modal_top1_disagreement(tokens: np.ndarray, top1: np.ndarray, is_code: np.ndarray,
                             num_experts: int, min_count: int) -> tuple[float, int]:
    """Fraction of token ids (seen >= min_count times in each domain) whose modal top-1 expert
    differs between the code and the prose occurrences; and the number of such ids."""
    vocab = int(tokens.max()) + 1
    counts = {}
    for label, sel in (("code", is_code), ("prose", ~is_code)):
        flat = tokens[sel] * num_experts + top1[sel]
        counts[label] = np.bincount(flat, minlength=vocab * num_experts).reshape(vocab, num_experts)
    both = (counts["code"].sum(1) >= min_count) & (counts["prose"].sum(1) >= min_count)
    if not both.any():
        return float("nan"), 0
    differ = counts["code"][both].argmax(1) != counts["prose"][both].argmax(1)
    return float(differ.mean()), int(both.sum())


def routing_summary(result: EvalResult, labels: np.ndarray, num_experts: int,
                    min_count: int = 5, seed: int = 0) -> dict:
    """Routing facts on labelled windows (labels [N] of "code"/"prose"), per layer.

    Returns a JSON-able dict of lists indexed by layer:
      load: [L][E] share of top-k assignments over all non-pad tokens (uniform = 1/E).
      load_min, load_max: [L] smallest / largest share.
      load_code, load_prose: [L][E] the same share within each domain.
      share_ratio: [L][E] load_code / load_prose.
      most_specialised: [L] {expert, ratio, code_share, prose_share} for the expert with the
        largest max(ratio, 1/ratio).
      entropy: [L] mean over tokens of router entropy / log(E).
      top1_domain_disagreement: [L] over token ids that occur at least `min_count` times as
        input in each domain, the fraction whose most frequent top-1 expert in code differs
        from the one in prose; `..._shuffled` the same with the window labels randomly
        permuted (seeded), a chance-level reference; `..._ids` how many ids qualified.
    """
    valid = result.valid
    is_code_row = np.asarray(labels) == "code"
    load = _load(result.expert_index, valid, num_experts)
    load_code = _load(result.expert_index[is_code_row], valid[is_code_row], num_experts)
    load_prose = _load(result.expert_index[~is_code_row], valid[~is_code_row], num_experts)
    with np.errstate(divide="ignore"):
        ratio = load_code / load_prose
    fold = np.maximum(ratio, 1 / ratio)
    entropy = np.stack([result.entropy[..., layer][valid].mean() for layer in range(load.shape[0])])
    tokens = result.tokens[valid]
    row_code = np.broadcast_to(is_code_row[:, None], valid.shape)[valid]
    shuffled_rows = np.random.default_rng(seed).permutation(is_code_row)
    row_shuffled = np.broadcast_to(shuffled_rows[:, None], valid.shape)[valid]
    top1 = result.expert_index[..., 0][valid]  # [n, L]
    disagree, disagree_shuffled, n_ids = [], [], 0
    for layer in range(load.shape[0]):
        d, n_ids = _modal_top1_disagreement(tokens, top1[:, layer], row_code, num_experts, min_count)
        s, _ = _modal_top1_disagreement(tokens, top1[:, layer], row_shuffled, num_experts, min_count)
        disagree.append(d)
        disagree_shuffled.append(s)
    most = []
    for layer in range(load.shape[0]):
        e = int(np.argmax(fold[layer]))
        most.append({"expert": e, "ratio_code_over_prose": float(ratio[layer, e]),
                     "fold": float(fold[layer, e]), "code_share": float(load_code[layer, e]),
                     "prose_share": float(load_prose[layer, e])})
    return {
        "tokens": {"code": int(valid[is_code_row].sum()), "prose": int(valid[~is_code_row].sum())},
        "load": load.tolist(), "load_min": load.min(1).tolist(), "load_max": load.max(1).tolist(),
        "load_code": load_code.tolist(), "load_prose": load_prose.tolist(),
        "share_ratio": ratio.tolist(), "max_fold": fold.max(1).tolist(), "most_specialised": most,
        "entropy": (entropy / math.log(num_experts)).tolist(),
        "top1_domain_disagreement": disagree, "top1_domain_disagreement_shuffled": disagree_shuffled,
        "top1_domain_disagreement_ids": n_ids, "min_count": min_count,
    }


def load_bundled(directory: str | os.PathLike = ASSET_DIR):
    """The shipped grok-tiny: (config, int8 params via `load_params`, Tokenizer)."""
    from grokscope.session import load_model

    model = load_model(directory)
    return model.config, model.params, model.tokenizer


# ---------------------------------------------------------------------------------------------
# The run


def _param_counts(config: ModelConfig) -> dict[str, int]:
    from grokscope.layout import param_shapes

    shapes = param_shapes(config)
    total = sum(math.prod(s.shape) for s in shapes.values())
    expert = sum(math.prod(s.shape) for p, s in shapes.items() if "/moe/" in p)
    active = total - expert + expert * config.num_selected_experts // config.num_experts
    return {"total": total, "active_per_token": active, "experts": expert,
            "embedding": config.vocab_size * config.emb_size}


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _card(m: dict) -> str:
    """The model card, from the metrics dict alone (`grokscope/templates/model_card.md.j2`)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("grokscope", "templates"),
                                     autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    ev = dict(m["eval"])
    arch = m.get("arch", "grok1")
    shipped_format = "int8" if arch == "grok1" else "bfloat16"
    ev["shipped"] = ev.get("shipped", ev.get("int8"))
    return environment.get_template("model_card.md.j2").render(
        arch=arch, name=ARCHS[arch][1], shipped_format=shipped_format,
        config=m["config"], s=m["settings"], r=m.get("routing_shipped_heldout", m.get("routing_int8_heldout")),
        counts=m["parameters"], data=m["data"],
        ev=ev, train=m["train"], ffn_size=m["ffn_size"], command=m["command"], balance_coef=m["balance_coef"],
        z_loss_coef=m["z_loss_coef"], machine=m["machine"], total_wall_s=m["total_wall_s"],
        versions=", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        results=[(f"{shipped_format} (as shipped, via `load_params`)", ev["shipped"]),
                 ("float32 (before quantization)" if arch == "grok1" else "float32 (before rounding to bfloat16)",
                  ev["float"]),
                 ("unigram (train-split counts, add-0.5)", ev["unigram"])])


def main(arch: str = "grok1", out: str | os.PathLike | None = None, settings: TrainSettings = TrainSettings(),
         stdlib: str | None = None, size_check: bool = True, card_only: bool = False,
         command: str | None = None) -> int:
    """Trains a bundled model and writes its bundle; see the module docstring.

    Args:
      arch: "grok1" (grok-tiny) or "grok2" (grok2-tiny).
      out: the output directory (default: the bundled model's asset directory).
      settings: the run's settings (default: the shipped run's).
      stdlib: the standard library to read (default: this interpreter's).
      size_check: refuse an output over the 10 MB budget.
      card_only: only re-render OUT/README.md from OUT/metrics.json (no training).
      command: the command line recorded in the metrics and the model card.
    """
    import optax
    import sentencepiece as spm

    from grokscope.checkpoint import save_params
    from grokscope.formats import load_params
    from grokscope.formats.grok2 import save_release
    from grokscope.tokenizer import Tokenizer
    from grokscope.tokenizer_train import train_tok_json, write_tok_json

    t_start = time.time()
    if arch not in ARCHS:
        raise ValueError(f"--arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    base_config, name = ARCHS[arch]
    out = Path(out) if out is not None else bundled_model_dir(name)
    if card_only:
        metrics = json.loads((out / "metrics.json").read_text())
        (out / "README.md").write_text(_card(metrics))
        return 0
    if not 0 < settings.prose_rows < settings.batch:
        raise ValueError(f"--prose-rows: expected between 1 and --batch - 1 ({settings.batch - 1}), "
                         f"got {settings.prose_rows}")
    config = dataclasses.replace(base_config, sequence_len=settings.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    command = command or "grokscope train-tiny " + " ".join(sys.argv[2:])

    # Corpus, tokenizer, examples.
    docs = corpus.load_corpus(stdlib)
    info = corpus.manifest(docs)
    (out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    if arch == "grok1":
        model_bytes = corpus.train_tokenizer(docs, config.vocab_size)
        (out / "tokenizer.model").write_bytes(model_bytes)
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        tokenizer = Tokenizer(out / "tokenizer.model")
    else:
        write_tok_json(train_tok_json(corpus.tokenizer_lines(docs), config.vocab_size), out / "tokenizer.tok.json")
        tokenizer = sp = Tokenizer(out / "tokenizer.tok.json")
    examples = corpus.example_prompts(docs, sp)
    with open(out / "examples.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    _log(f"corpus {info['summary']}; tokenizer sha256 {tokenizer.sha256[:12]}; {len(examples)} examples")

    encoded = {}
    token_counts = {}
    for domain in ("code", "prose"):
        for split in ("train", "heldout"):
            sel = [d for d in docs if d.domain == domain and d.split == split]
            encoded[(domain, split)] = corpus.encode_documents(sp, sel)
            token_counts[f"{domain}/{split}"] = int(sum(len(x) for x in encoded[(domain, split)]))
    streams = _domain_streams({d: encoded[(d, "train")] for d in ("code", "prose")})
    unigram = corpus.unigram_log_probs(corpus.unigram_counts(
        encoded[("code", "train")] + encoded[("prose", "train")], config.vocab_size))
    heldout = {d: corpus.eval_windows(encoded[(d, "heldout")], settings.seq_len, settings.eval_tokens)
               for d in ("code", "prose")}
    trainsample = {d: corpus.eval_windows(encoded[(d, "train")], settings.seq_len, settings.eval_tokens // 4)
                   for d in ("code", "prose")}
    heldout_all = np.concatenate([heldout["code"], heldout["prose"]])
    heldout_labels = np.asarray(["code"] * len(heldout["code"]) + ["prose"] * len(heldout["prose"]))
    _log(f"tokens {token_counts}; held-out windows code {len(heldout['code'])}, prose {len(heldout['prose'])}")

    # Model and optimizer.
    # dense dispatch: differentiable (the grouped loop's dynamic trip counts are not)
    apply = make_forward(config, RecordSpec(routing=True), compute_dtype="float32", moe_dispatch="dense")
    params = _initial_params(config, settings.seed)
    opt, schedule = _make_optimizer(settings)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, tokens):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: lm_loss(apply, config, p, tokens), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux, optax.global_norm(grads)

    probe_windows = {d: w[: max(1, len(w) // 4)] for d, w in heldout.items()}
    rng = np.random.default_rng(settings.seed)
    history, curve = [], []
    t_train = time.time()
    t_after_compile = None
    for step in range(1, settings.steps + 1):
        batch = _sample_batch(rng, streams, settings)
        params, opt_state, loss, aux, gnorm = train_step(params, opt_state, batch)
        if step == 1:
            jax.block_until_ready(loss)
            t_after_compile = time.time()
        if step % settings.log_every == 0 or step == settings.steps or step == 1:
            rec = {"step": step, "loss": float(loss), "ce": float(aux["ce"]),
                   "balance": [float(x) for x in aux["balance"]], "z": [float(x) for x in aux["z"]],
                   "grad_norm": float(gnorm), "lr": float(schedule(step - 1)),
                   "elapsed_s": round(time.time() - t_train, 1)}
            history.append(rec)
            _log(f"step {step} loss {rec['loss']:.4f} ce {rec['ce']:.4f} "
                 f"bal {np.mean(rec['balance']):.3f} z {np.mean(rec['z']):.2f} "
                 f"gnorm {rec['grad_norm']:.2f} lr {rec['lr']:.2e} t {rec['elapsed_s']}s")
        if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
            point = {"step": step}
            for d, w in probe_windows.items():
                point[d] = heldout_loss(evaluate(params, config, w))
            curve.append(point)
            _log(f"eval step {step}: held-out (first quarter) code {point['code']:.4f} prose {point['prose']:.4f}")
    jax.block_until_ready(params)
    t_end = time.time()
    wall = t_end - t_train
    step_s = (t_end - t_after_compile) / max(1, settings.steps - 1)
    final_window = max(1, settings.steps // 20)
    final_ce = float(np.mean([h["ce"] for h in history if h["step"] > settings.steps - final_window]))

    # Save as the release does (int8 for Grok-1, bf16 safetensors for Grok-2), reload as shipped, evaluate.
    ckpt = out / "ckpt-0"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    for old in out.glob("pytorch_model-*.safetensors"):
        old.unlink()
    float_params = jax.device_get(params)
    if arch == "grok1":
        save_params(float_params, out, config)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    else:
        save_release(float_params, config, out)
        (out / "config.json").write_text(json.dumps(config.to_hf(), indent=1) + "\n")
    shipped = load_params(out, config)

    ev: dict[str, dict[str, float]] = {}
    shipped_result = None
    for name, p in (("float", float_params), ("shipped", shipped)):
        result = evaluate(p, config, heldout_all)
        e = {"all": heldout_loss(result)}
        for d in ("code", "prose"):
            e[d] = heldout_loss(result.select(heldout_labels == d))
        train_eval = evaluate(p, config, np.concatenate([trainsample["code"], trainsample["prose"]]))
        e["train"] = heldout_loss(train_eval)
        ev[name] = e
        if name == "shipped":
            shipped_result = result
        _log(f"{name}: {e}")
    ev["unigram"] = {"all": corpus.unigram_loss(unigram, heldout_all),
                     "code": corpus.unigram_loss(unigram, heldout["code"]),
                     "prose": corpus.unigram_loss(unigram, heldout["prose"]),
                     "train": corpus.unigram_loss(unigram, np.concatenate([trainsample["code"], trainsample["prose"]]))}
    _log(f"unigram: {ev['unigram']}")
    routing = routing_summary(shipped_result, heldout_labels, config.num_experts, seed=settings.seed)
    _log(f"routing: load min {routing['load_min']} max {routing['load_max']} fold {routing['max_fold']} "
         f"entropy {routing['entropy']} disagreement {routing['top1_domain_disagreement']}")

    import importlib.metadata as md

    metrics = {
        "command": command,
        "arch": arch,
        "config": config.to_dict(),
        "ffn_size": config.ffn_size,
        "parameters": _param_counts(config),
        "settings": dataclasses.asdict(settings),
        "balance_coef": BALANCE_COEF,
        "z_loss_coef": Z_LOSS_COEF,
        "data": {"heldout_rule": info["heldout_rule"], "summary": info["summary"], "tokens": token_counts,
                 "corpus_sha256": info["corpus_sha256"], "python": platform.python_version(),
                 "stdlib": str(stdlib or corpus.stdlib_dir()), "tokenizer_sha256": tokenizer.sha256,
                 "examples": len(examples)},
        "train": {"wall_s": wall, "step_s": step_s, "compile_s": t_after_compile - t_train,
                  "tokens_seen": settings.steps * settings.batch * settings.seq_len,
                  "final_ce": final_ce, "final_window": final_window, "history": history,
                  "heldout_curve": curve},
        "eval": ev,
        "criteria": {"shipped_vs_unigram_reduction": 1 - ev["shipped"]["all"] / ev["unigram"]["all"],
                     "shipped_vs_float_relative": ev["shipped"]["all"] / ev["float"]["all"] - 1,
                     "min_load": min(routing["load_min"]), "max_fold": max(routing["max_fold"])},
        "routing_shipped_heldout": routing,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax backend {jax.default_backend()}",
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": md.version("jaxlib"),
                     "dm-haiku": md.version("dm-haiku"), "optax": optax.__version__,
                     "numpy": np.__version__, "sentencepiece": md.version("sentencepiece"),
                     "tiktoken": md.version("tiktoken")},
    }
    metrics["total_wall_s"] = time.time() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "README.md").write_text(_card(metrics))
    size = _dir_bytes(out)
    _log(f"wrote {out} ({size:,} bytes); criteria {metrics['criteria']}")
    if size > SIZE_BUDGET_BYTES and size_check:
        raise ValueError(f"{out}: {size:,} bytes, over the {SIZE_BUDGET_BYTES:,}-byte budget (--no-size-check allows it)")
    return 0

