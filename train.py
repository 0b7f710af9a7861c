"""
Train CLIP with miniclip.

    python train.py --tiny                              a small CLIP on generated shapes, on a CPU, in minutes
    python train.py --data pairs.csv --steps 5000       your own image-caption pairs (a CSV)
    python train.py --data "shards/{00000..00099}.tar"  or webdataset shards, streamed

--tiny makes its own data: solid shapes (8 colors x 6 kinds) on dark backgrounds, with captions such
as "a drawing of a big blue star on the left". A quarter of the color-shape pairs never appear in
training. The run ends by classifying images of exactly those unseen pairs among all 48 "<color>
<shape>" labels, zero-shot, so its accuracy measures composition ("purple" + "star"), not memory.
The data sets and how their images are streamed live in data.py.

Training follows the CLIP paper: AdamW (beta2 0.98, eps 1e-6), weight decay on weight tensors only
(not gains or biases), linear warmup then cosine decay, a learned temperature clipped at 100, and a
random square crop as the only augmentation. A checkpoint holds the weights, the optimizer, the step,
the tokenizer, a fingerprint of the data, and the labels and templates for zeroshot.py. The batch of
every step is a function of the seed and the step alone, so --resume continues a run exactly.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback

import miniclip as mc  # first: it makes OpenBLAS's settings before NumPy loads (mc.cpu_settings)
import numpy as np
from PIL import Image

import bpe
import data
import weights
from data import UserError
from zeroshot import evaluate, trim


class GroupError(UserError):
    """A UserError raised on every process of a data-parallel run at once (as on the only one of a plain run)."""


# -----------------------------------------------------------------------------
# The run: its settings and its state


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500             # optimizer steps in all
    batch_size: int = 128         # pairs per step; the contrastive loss sees batch_size^2 pairs
    lr: float = 2e-3              # peak learning rate, after warmup (--tiny: chosen over 5 seeds, README)
    warmup: int = 100             # steps of linear warmup from 0
    weight_decay: float = 0.2     # AdamW's decoupled decay, on weight tensors only (the paper's 0.2)
    seed: int = 0
    n_train: int = 24000          # --tiny: generated training images
    n_eval: int = 1200            # --tiny: generated held-out images (of the unseen pairs)
    log_every: int = 50
    eval_every: int = 500         # save a checkpoint, then evaluate, this often
    temperature: float = 0.0      # 0: learned, as CLIP does; T > 0: the logit scale fixed at 1/T (an ablation)
    random_crop: bool = True      # a random square crop each step, the paper's only augmentation; else the center


@dataclasses.dataclass
class Run:
    """The state of a run, what setup() builds and the loop advances."""
    tc: TrainConfig
    cfg: mc.Config
    params: dict                  # name -> array on the device
    opt: mc.AdamW
    tok: bpe.Tokenizer
    train_set: data.Pairs
    val: data.Pairs               # the pairs evaluated every eval_every steps
    labels: list                  # zero-shot labels and their prompt templates, stored in the checkpoint
    templates: list
    held: list                    # --tiny: the held-out color-shape pairs
    fingerprint: str              # of the training data, so that --resume can tell it is the same
    data_args: dict               # the data options (DATA_ARGS), saved so that --resume reads the same data
    step: int = 0                 # optimizer steps taken


def lr_at(step, tc):
    """Linear warmup to tc.lr over tc.warmup steps, then cosine decay to 0 at tc.steps."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return 0.5 * tc.lr * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# The loop, and what it writes


def train_loop(args, run, group=None):
    tc, cfg, params, opt, tok, train_set, val = run.tc, run.cfg, run.params, run.opt, run.tok, run.train_set, run.val
    K, rank = (group.size, group.rank) if group else (1, 0)
    if tc.batch_size % K:
        raise GroupError(f"the batch of {tc.batch_size} does not split evenly over {K} processes")
    shard = slice(rank * tc.batch_size // K, (rank + 1) * tc.batch_size // K)
    lead = rank == 0                                    # only process 0 prints, evaluates and saves
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    print(f"model: {n_params / 1e6:.2f}M parameters, {cfg}")
    if group:
        print(f"data-parallel: {K} processes, {tc.batch_size // K} pairs each of every batch of {tc.batch_size}")
    out = args.out or args.resume or "checkpoints/tiny.npz"
    metrics = metrics_log(out, run.step if args.resume else None, lead)

    def log(record):
        if lead:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save():
        if lead:
            save_checkpoint(out, run)

    # Ctrl-C or SIGTERM ends the run after the step in progress, so the saved state is consistent.
    # A second Ctrl-C stops at once, without saving (main() reports it). In a data-parallel run the
    # processes agree after each step, so they stop together even if only one got the signal.
    stop = []

    def request_stop(signum, frame):
        stop.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    stop_at = min(tc.steps, args.stop_at or tc.steps)
    slack = data.load_size(cfg.image_size) - cfg.image_size

    def plan():                                         # this process's share of each batch, in step order
        for s in range(run.step, stop_at):
            idx, offsets = data.batch_plan(s, len(train_set), tc.batch_size, tc.seed, slack, tc.random_crop)
            yield idx[shard], offsets[shard]

    loader = data.Loader(cfg.image_size, args.workers, skip_bad=run.data_args["skip_bad"])
    batches = loader.batches(train_set, plan())
    t_start, seen, t_log, waited = time.time(), 0, time.time(), 0.0
    stopping = False
    try:
        while run.step < stop_at and not stopping:
            t_wait = time.time()
            crops, idx = next(batches)                  # blocks only when the workers fall behind
            waited += time.time() - t_wait
            pixels, batch_ids = batch_inputs(crops, [train_set.captions[i] for i in idx], tok, cfg)
            with np.errstate(all="ignore"):             # a non-finite loss is reported just below
                if group:
                    loss, grads = data_parallel_loss_and_grads(params, cfg, pixels, batch_ids, group,
                                                               args.grad_checkpointing)
                else:
                    loss, grads = mc.loss_and_grads(params, cfg, pixels, batch_ids, args.grad_checkpointing)
            if not math.isfinite(loss):                 # the loss is the batch's, so every process stops here
                raise GroupError(f"the loss became {loss} at step {run.step + 1}; stopping. The last good "
                                 f"checkpoint is {out if os.path.exists(out) else '(none saved yet)'}; try a lower --lr")
            lr = lr_at(run.step, tc)
            opt.step(params, grads, lr)
            mc.clamp_logit_scale(params)
            run.step += 1
            step = run.step
            seen += tc.batch_size
            stopping = group.any(stop) if group else bool(stop)
            if step % tc.log_every == 0 or step == stop_at:
                now = time.time()
                rate = seen / (now - t_log)
                eta = (stop_at - step) * tc.batch_size / rate
                scale = mc.logit_scale_value(params)
                wait = waited / (now - t_log)           # the share of the time spent waiting for images
                print(f"step {step:5d}/{tc.steps} | loss {loss:.4f} | lr {lr:.2e} | logit scale {scale:6.2f} | "
                      f"{rate:6.0f} img/s | data {wait:4.0%} | ETA {eta:4.0f}s")
                log({"step": step, "loss": loss, "lr": lr, "logit_scale": scale, "img_per_s": rate, "data_wait": wait})
                seen, t_log, waited = 0, now, 0.0
            if step % tc.eval_every == 0 or step == tc.steps:
                save()                                  # before evaluating, so a failed evaluation loses nothing
                if val is not None and lead:
                    m = evaluate(params, cfg, tok, val, val.label_names, run.templates, loader)
                    print(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
                    log({"step": step, "eval": m})
    finally:
        loader.close()
        if metrics:
            metrics.close()
    if stopping:
        print(f"interrupted ({stop[0] if stop else 'a signal to another process'}) at step {run.step}")
    if run.step % tc.eval_every and run.step != tc.steps:
        save()
    print(f"saved {out} at step {run.step} ({time.time() - t_start:.0f}s of training)")
    if group:
        counts = group.comm.gather(loader.decoded)
        if lead and any(counts):
            print(f"images decoded by each process: {counts}")
    if lead:
        leave_beside(out, run)
    if run.step < tc.steps:
        print(f"resume with: python train.py --resume {out}")
        return 130 if stopping else 0
    return 0


def leave_beside(out, run):
    """What a run leaves beside its checkpoint: the curves' figure, and once --tiny is done, held-out samples to try."""
    plot_curves(os.path.splitext(out)[0])
    if run.held and run.step == run.tc.steps:
        samples = save_samples(os.path.join(os.path.dirname(out), "samples"), run.val, run.held, run.cfg.image_size)
        print(f"held-out samples: {' '.join(samples)}")
        if run.cfg.objective == "contrastive":
            print(f"try: python zeroshot.py {samples[0]}")


def batch_inputs(crops, captions, tok, cfg):
    """uint8 crops (n, S, S, 3) and n captions -> the model's (pixels (n, 3, S, S), ids (n, T)) on the device."""
    ids = tok.tokenize(captions, cfg.context_length, truncate=True)
    return mc.to_device(mc.normalize_pixels(crops)), mc.to_device(trim(ids))


def save_checkpoint(path, run):
    """Everything a resumed run needs (optimizer moments, step, the data's fingerprint), and zeroshot.py too."""
    opt = run.opt
    meta = {"tokenizer": run.tok.to_list(), "labels": run.labels, "templates": run.templates,
            "held_out_pairs": [" ".join(p) for p in run.held], "train_config": dataclasses.asdict(run.tc),
            "data_args": run.data_args, "data_fingerprint": run.fingerprint, "step": run.step, "adam_t": opt.t}
    extra = {**{f"adam.m.{k}": v for k, v in opt.m.items()}, **{f"adam.v.{k}": v for k, v in opt.v.items()}}
    weights.save_weights(path, run.params, run.cfg, meta=meta, extra=extra)


def metrics_log(out, resumed_step, lead):
    """
    The metrics file beside the checkpoint, opened for appending. A fresh run starts it empty. A
    resumed run keeps the records up to its step and drops any that a killed run wrote after its
    last save, so each step appears once.
    """
    if not lead:
        return None
    path = os.path.splitext(out)[0] + ".metrics.jsonl"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if resumed_step is None:
            return open(path, "w")
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        bpe.write_atomic(path, "".join(kept))
        return open(path, "a")
    except OSError as e:
        raise UserError(f"cannot write beside {out}: {e.strerror} ({e.filename})") from None


def plot_curves(stem):
    """stem.png: the loss and every evaluation metric of stem.metrics.jsonl against the step, if matplotlib is here."""
    try:
        import matplotlib
        matplotlib.use("Agg")                           # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        print("no curves figure: matplotlib is not installed (pip install matplotlib)")
        return
    with open(stem + ".metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if losses:
        left.plot(*zip(*losses))
    left.set(xlabel="step", ylabel="training loss", title="loss")
    for name in (evals[0][1] if evals else {}):
        right.plot([s for s, _ in evals], [m[name] for _, m in evals], marker="o", label=name)
    right.set(xlabel="step", ylim=(0, 1), title="evaluation")
    if evals:
        right.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)
    print(f"curves: {stem}.png")


# -----------------------------------------------------------------------------
# Setting a run up: the options, the model, the tokenizer and the data, fresh or from --resume


# What --resume restores of the data options, so that it reads and splits the data as the run did.
DATA_ARGS = ("data", "csv_img_key", "csv_caption_key", "csv_label_key", "csv_separator", "val", "val_frac",
             "val_max", "skip_bad", "labels_file", "template")
AT_LEAST = {"steps": 1, "batch_size": 1, "warmup": 0, "n_train": 1, "n_eval": 1, "log_every": 1,
            "eval_every": 1, "val_max": 0, "workers": 0, "stop_at": 1, "vocab_size": 512 + 2}


def check_args(args):
    """Every option, checked before any file is read or written: a bad one is one line that names it."""
    for name, low in AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a finite number above 0, got {args.lr}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--weight-decay must be finite and at least 0, got {args.weight_decay}")
    if args.temperature is not None and args.temperature != 0 and not (
            math.isfinite(args.temperature) and 1 / mc.MAX_LOGIT_SCALE <= args.temperature):
        raise UserError(f"--temperature must be 0 (learned) or at least {1 / mc.MAX_LOGIT_SCALE}, "
                        f"CLIP's cap, got {args.temperature}")
    if not 0 <= args.val_frac < 1:
        raise UserError(f"--val-frac must be at least 0 and below 1, got {args.val_frac}")
    data.csv_separator(args.csv_separator)
    if args.objective != "contrastive" and args.init:
        raise UserError(f"--objective {args.objective} trains from scratch: it cannot start from --init's weights")
    shaped = [f"--{k.replace('_', '-')}" for k in ("model_config", *SHAPE_FIELDS) if getattr(args, k) is not None]
    if shaped and (args.init or args.resume or args.tiny):
        raise UserError(f"{shaped[0]} sets a new model's shape; {'--init' if args.init else '--resume' if args.resume else '--tiny'}"
                        " fixes it")
    if not (args.init or args.resume):
        model_config(args)                              # a bad shape is refused before any file is read
    if args.tiny and (args.data or args.init or args.preset != "tiny"):
        given = "--data" if args.data else "--init" if args.init else f"--preset {args.preset}"
        raise UserError(f"--tiny is the tiny model on generated shapes; {given} asks for another run: give one of them")
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in ("init", "data", "val", "tokenizer", "labels_file", "template")
                 if getattr(args, k)] + (["--tiny"] if args.tiny else [])
        if given:
            raise UserError(f"--resume continues the saved run with its own data and model; drop {', '.join(given)}")
    if args.val and not args.data:
        raise UserError("--val is the validation CSV of a --data run")
    for t in args.template or ():
        if "{}" not in t:
            raise UserError(f"--template {t!r} has no {{}} for the label")
    for flag in ("resume", "init", "tokenizer", "val", "labels_file"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file or directory")


# The config fields a run can set on top of --preset, as flags (--vision-width 128) or in --model-config's JSON.
SHAPE_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp_width",
                "context_length", "text_width", "text_layers", "text_heads", "text_mlp_width", "embed_dim",
                "activation")


def model_config(args):
    """--preset's shape, changed by --model-config's fields and then by the shape flags; a bad one is a UserError."""
    changes = {}
    if args.model_config:
        try:
            changes = weights.read_json(args.model_config)
        except (OSError, ValueError) as e:
            raise UserError(f"--model-config {args.model_config}: {getattr(e, 'strerror', None) or e}") from None
        unknown = set(changes) - set(SHAPE_FIELDS) if isinstance(changes, dict) else None
        if unknown is None or unknown:
            raise UserError(f"--model-config {args.model_config}: a JSON object of the fields {', '.join(SHAPE_FIELDS)}"
                            + (f"; not {', '.join(sorted(unknown))}" if unknown else ""))
    changes |= {k: getattr(args, k) for k in SHAPE_FIELDS if getattr(args, k) is not None}
    try:
        return dataclasses.replace(mc.PRESETS[args.preset], objective=args.objective, **changes)
    except (ValueError, TypeError) as e:
        raise UserError(f"model shape: {e}") from None


def load_model(args):
    """(params or None, cfg, tokenizer or None): --init's weights and tokenizer, or the shape model_config gives."""
    tok = bpe.load(args.tokenizer) if args.tokenizer else None
    if not args.init:
        return None, model_config(args), tok
    if os.path.isdir(args.init) or ".safetensors" in args.init:    # a published model's folder or file
        params, cfg = weights.load_weights(args.init)
        return params, cfg, tok or bpe.load(weights.model_folder(args.init))
    if not os.path.isfile(args.init):
        raise UserError(f"{args.init}: no such file or directory")
    params, cfg, meta, _ = weights.load_checkpoint(args.init)        # ours: weights and tokenizer, read once
    if tok is None and "tokenizer" not in meta:
        raise UserError(f"{args.init}: the checkpoint holds no tokenizer; give --tokenizer")
    return {k: v.astype(np.float32) for k, v in params.items()}, cfg, tok or bpe.from_list(meta["tokenizer"])


# A tokenizer learns its merges from at most this many captions, a seeded sample (--tiny's 24,000 are
# all used), so that start-up time does not grow with the data set. A vocabulary learned from more
# text, or CLIP's own, comes in with --tokenizer.
TOKENIZER_CAPTIONS = 25_000


def learn_tokenizer(captions, vocab_size, seed):
    if len(captions) > TOKENIZER_CAPTIONS:
        pick = np.random.default_rng(seed).choice(len(captions), TOKENIZER_CAPTIONS, replace=False)
        captions = [captions[i] for i in pick]
    t0 = time.time()
    print(f"tokenizer: learning {vocab_size} tokens from {len(captions):,} captions")
    tok = bpe.learn(captions, vocab_size, verbose=True)
    print(f"tokenizer: {len(tok.merges)} merges learned, {tok.vocab_size} tokens; {time.time() - t0:.1f}s")
    return tok


def build_data(args, cfg, tc):
    """
    The training and evaluation pairs for a model of cfg's image size, the labels and templates that
    the checkpoint keeps for zeroshot.py, the held-out color-shape pairs (--tiny), and a fingerprint
    of the training data. Validation is --val's CSV, or a --val-frac split of --data; zero-shot
    accuracy is measured among the labels of its label column, when it has one.
    """
    templates = args.template or list(data.TEMPLATES)
    if args.data is None:
        train_set, val, held = data.shapes_world(tc.n_train, tc.n_eval, tc.seed, cfg.image_size)
        return train_set, val, data.LABELS, templates, held, train_set.fingerprint()
    columns = (args.csv_img_key, args.csv_caption_key, args.csv_separator, args.skip_bad, args.csv_label_key)
    pairs = data.read_data(args.data, *columns)
    if args.val:
        train_set, val = pairs, data.read_csv(args.val, *columns[:2], data.csv_separator(columns[2]), *columns[3:])
    else:
        train_set, val = data.split(pairs, args.val_frac, args.val_max, tc.seed)
    where = f"from {pairs.source}" + (f" and {val.source}" if args.val else "")
    of = f", of {len(val.label_names)} labels" if val is not None and val.label_names else ""
    print(f"data: {len(train_set)} training pairs, {len(val) if val else 0} validation pairs {where}{of}")
    labels = data.read_lines(args.labels_file, "labels") if args.labels_file else (
        val.label_names if val is not None and val.label_names else [])
    if args.labels_file and not labels:
        raise UserError(f"{args.labels_file}: no labels in the file")
    return train_set, val, labels, templates, [], pairs.fingerprint()


def save_samples(folder, val, held, image_size):
    """A few held-out images as PNG, the model's exact input size, for trying zeroshot.py."""
    os.makedirs(folder, exist_ok=True)
    crops = data.center_crop(val.images, image_size)
    written = []
    for color, kind in held[:4]:
        i = next(j for j, k in enumerate(val.keys) if k[:2] == (color, kind))
        path = os.path.join(folder, f"{color}_{kind}.png")
        Image.fromarray(crops[i]).save(path)
        written.append(path)
    return written


def fix_temperature(params, tc):
    """With --temperature T, the logit scale is set to log(1/T) (and optimizer() keeps it there)."""
    if tc.temperature:
        params["logit_scale"] = mc.xp.asarray(math.log(1 / tc.temperature), dtype=params["logit_scale"].dtype)


def optimizer(params, tc):
    """AdamW with the run's weight decay; with --temperature, the logit scale frozen."""
    return mc.AdamW(params, weight_decay=tc.weight_decay, frozen=("logit_scale",) if tc.temperature else ())


def setup(args):
    """Everything the loop needs, fresh or from --resume: the Run. Reads files, writes none, and leaves
    args as they were (a resumed run's data options are the saved ones, in a copy)."""
    check_args(args)
    args = argparse.Namespace(**vars(args))
    if args.resume:
        params, cfg, meta, extra = weights.load_checkpoint(args.resume)
        if "adam_t" not in meta:
            raise UserError(f"{args.resume}: holds weights only, no training state to resume (use --init)")
        overrides = {k: getattr(args, k) for k in ("steps", "log_every", "eval_every") if getattr(args, k) is not None}
        tc = dataclasses.replace(TrainConfig(**meta["train_config"]), **overrides)
        if tc.steps < meta["step"]:
            raise UserError(f"--steps {tc.steps}: {args.resume} is already at step {meta['step']}")
        for k in DATA_ARGS:                             # the data of the interrupted run
            setattr(args, k, meta["data_args"].get(k, getattr(args, k)))
        tok = bpe.from_list(meta["tokenizer"])
    else:
        tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                            if getattr(args, f.name) is not None})
        params, cfg, tok = load_model(args)             # the model first: its image size shapes the data
    train_set, val, labels, templates, held, fingerprint = build_data(args, cfg, tc)
    if args.resume and fingerprint != meta["data_fingerprint"]:
        raise UserError(f"{args.resume}: the data changed since this run was saved (its fingerprint was "
                        f"{meta['data_fingerprint']}, the data now gives {fingerprint}); --resume needs the "
                        f"same data. To train on the new data, start a run with --init {args.resume}")
    if tc.batch_size > len(train_set):
        raise UserError(f"--batch-size {tc.batch_size} is more than the {len(train_set)} training pairs")
    if tok is None:
        tok = learn_tokenizer(train_set.captions, args.vocab_size or cfg.vocab_size, tc.seed)
    if params is None:
        cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
        params = mc.init_params(cfg, seed=tc.seed)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}")
    params = mc.to_device(params)
    fix_temperature(params, tc)
    opt = optimizer(params, tc)
    if args.resume:
        opt.m = mc.to_device({k: extra[f"adam.m.{k}"] for k in params})
        opt.v = mc.to_device({k: extra[f"adam.v.{k}"] for k in params})
        opt.t = meta["adam_t"]
        print(f"resumed from {args.resume} at step {meta['step']}")
    return Run(tc=tc, train_set=train_set, val=val, labels=labels, templates=templates, held=held,
               fingerprint=fingerprint, data_args={k: getattr(args, k) for k in DATA_ARGS}, params=params,
               cfg=cfg, tok=tok, opt=opt, step=meta["step"] if args.resume else 0)


def run_training(args, group=None):
    """Train; with a group, as one of its processes. Returns the exit status."""
    if args.device:
        mc.set_device(args.device)
    if group is not None and mc.xp is not np:           # one GPU per process, taken in turn on each machine
        local_rank = group.comm.Split_type(group.MPI.COMM_TYPE_SHARED).rank
        mc.xp.cuda.Device(local_rank % mc.xp.cuda.runtime.getDeviceCount()).use()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        if group is None:
            return train_loop(args, setup(args))
        run = group.agree(lambda: setup(args))
        if run.cfg.objective != "contrastive":         # the same on every process, so all stop here
            raise GroupError(f"--objective {run.cfg.objective} runs on one process only")
        check_same_start(run, group)
        return train_loop(args, run, group)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def check_same_start(run, group):
    """Every process of a data-parallel run must start from the same weights, step and data."""
    start = (run.step, run.fingerprint, sum(float(abs(run.params[k]).sum()) for k in sorted(run.params)))
    if len(set(group.comm.allgather(start))) > 1:
        raise GroupError("the processes start from different weights, steps or data: every machine must "
                         "run the same code on the same files")


# -----------------------------------------------------------------------------
# Data-parallel training on MPI
#
# `mpirun -n K python train.py ...` starts K copies of this script, which share every global batch of
# N pairs: each process encodes its own n = N / K of them. The loss must still contrast each image with
# all N texts, since a bigger batch means more negatives and that is what CLIP's batch size buys. So the
# processes all-gather their normalized features, and each computes the loss rows of its own pairs
# against the whole batch (clip_loss_forward with rows): open_clip's "local loss with gathered
# features". Each row of the loss needs only its own row of logits, so this is exact.
#
# The gradient, derived. Let f_j be the normalized features (image and text) of pair j, and L_r the loss
# of process r's rows, so the loss of the batch is L = (1/K) sum_r L_r. L_r depends on its own f_j as
# rows of logits, and on all N of them as columns, so for every pair j
#     dL/df_j = (1/K) sum_r dL_r/df_j
# Process r can compute dL_r/df for all N pairs (clip_loss_backward returns (N, E)). Summing these over
# the processes and handing each its own n rows is one reduce-scatter. The common mistake is to treat
# the gathered features as constants, keeping only process r's terms for its own pairs: that drops every
# gradient a feature gets as a negative in another process's rows, (K - 1) / K of its negatives.
# Each process then backpropagates its n rows through its encoders, which gives
#     g_r = sum_{j in r} (df_j/dtheta)^T sum_q dL_q/df_j
# and the gradient of L is (1/K) sum_r g_r: an all-reduce, averaged. logit_scale enters every L_r
# directly, and its gradient is averaged with the rest.


# Set by the launchers: MPICH's mpirun (PMI_SIZE), Open MPI's (OMPI_COMM_WORLD_SIZE), and Slurm's srun
# (PMI_SIZE or PMIX_RANK). Without one of them, train.py runs as one process and never imports mpi4py.
LAUNCHER_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class MPIGroup:
    """
    The K processes of one data-parallel run (mpi4py's COMM_WORLD) and the collectives training uses.
    On a GPU, arrays go through host memory unless device_arrays is set, for an MPI that reads GPU
    memory itself (a CUDA-aware build).
    """

    def __init__(self, MPI, device_arrays=False):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.rank, self.comm.size
        self.device_arrays = device_arrays

    def _out(self, x):
        """x as the kind of buffer MPI is handed, contiguous."""
        if not self.device_arrays:
            return np.ascontiguousarray(mc.to_numpy(x))
        if mc.xp is not np:
            mc.xp.cuda.get_current_stream().synchronize()   # MPI must not read memory a kernel is still writing
        return mc.xp.ascontiguousarray(x)

    def _empty(self, shape, dtype):
        return (mc.xp if self.device_arrays else np).empty(shape, dtype)

    def allgather(self, x):
        """(n, ...) on every process -> (K n, ...) on every process, in rank order."""
        x = self._out(x)
        out = self._empty((self.size * x.shape[0],) + x.shape[1:], x.dtype)
        self.comm.Allgather(x, out)
        return mc.to_device(out)

    def reduce_scatter(self, x):
        """(K n, ...) on every process -> this process's n rows of the sum over processes."""
        x = self._out(x)
        out = self._empty((x.shape[0] // self.size,) + x.shape[1:], x.dtype)
        self.comm.Reduce_scatter_block(x, out, op=self.MPI.SUM)
        return mc.to_device(out)

    def mean(self, arrays):
        """A dict of arrays averaged over the processes, in one all-reduce of one flat buffer."""
        flat = self._out(mc.xp.concatenate([a.reshape(-1) for a in arrays.values()]))
        self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        flat = mc.to_device(flat) / self.size
        out, at = {}, 0
        for k, a in arrays.items():
            out[k] = flat[at:at + a.size].reshape(a.shape)
            at += a.size
        return out

    def any(self, flag):
        """True on every process if it is true on any."""
        return self.comm.allreduce(bool(flag), op=self.MPI.LOR)

    def agree(self, fn):
        """
        Run fn() on every process. If it raises a user's error on any, every process raises, so none
        waits forever for the others, and the first process's message is the one reported.
        """
        try:
            result, message = fn(), None
        except (UserError, ValueError) as e:
            result, message = None, str(e)
        failed = [(r, m) for r, m in enumerate(self.comm.allgather(message)) if m is not None]
        if failed:
            r, m = failed[0]
            raise GroupError(m if r == 0 else f"process {r}: {m}")
        return result


def launcher_rank():
    """This process's number as the MPI launcher gave it, before MPI starts (0 without a launcher)."""
    return int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK") or 0)


def mpi_group():
    """The data-parallel group when an MPI launcher started more than one process, else None."""
    if not any(k in os.environ for k in LAUNCHER_VARS):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise GroupError("an MPI launcher started this, but mpi4py is not installed: "
                        "pip install -r requirements-dist.txt") from None
    if MPI.COMM_WORLD.size == 1:
        return None
    return MPIGroup(MPI, device_arrays=os.environ.get("MINICLIP_CUDA_AWARE_MPI") == "1")


def data_parallel_loss_and_grads(params, cfg, pixels, ids, group, checkpoint=False):
    """
    mc.loss_and_grads for a global batch spread over the processes of `group`: pixels and ids are
    this process's n pairs, rank r holding pairs r n ... (r + 1) n - 1 of the batch. Returns the loss
    and gradients of the whole batch of K n pairs, the same on every process.
    """
    (img, txt), cache = mc.features_forward(params, cfg, pixels, ids, checkpoint)  # (n, E) each
    n, E = img.shape
    both = group.allgather(mc.xp.concatenate([img, txt], axis=1))      # (N, 2E): both in one message
    mine = slice(group.rank * n, (group.rank + 1) * n)
    loss, loss_cache = mc.clip_loss_forward(both[:, :E], both[:, E:], params["logit_scale"], mine)
    dimg, dtxt, dt = mc.clip_loss_backward(loss_cache)                 # (N, E) each: dL_r/df of every pair
    d = group.reduce_scatter(mc.xp.concatenate([dimg, dtxt], axis=1))  # (n, 2E): sum_q dL_q/df, own pairs
    grads = mc.features_backward(d[:, :E], d[:, E:], cache, params)    # g_r
    grads["logit_scale"] = dt
    grads = group.mean({"loss": mc.xp.asarray(loss, dtype=dt.dtype), **grads})
    return float(grads.pop("loss")), grads


def abort(group):
    """
    End every process of the run. The launcher forwards each process's output on its own time, and
    Abort ends the forwarding too, so the error just printed is flushed and given a moment to arrive.
    """
    sys.stderr.flush()
    time.sleep(0.5)
    group.comm.Abort(1)


# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data")
    src.add_argument("--tiny", action="store_true", help="the tiny model on generated shapes (what runs without "
                     "--data, --init or --preset; with them, refused)")
    src.add_argument("--data", nargs="+", help="a CSV of image paths and captions (paths relative to the CSV), or "
                     "webdataset .tar shards: paths or brace patterns such as 'shards/{00000..00099}.tar'")
    src.add_argument("--csv-img-key", default="filepath", help="image path column (default: filepath)")
    src.add_argument("--csv-caption-key", default="title", help="caption column (default: title)")
    src.add_argument("--csv-label-key", default="label", help="label column, if the CSV has one: zero-shot accuracy "
                     "is measured among the validation pairs' labels (default: label)")
    src.add_argument("--csv-separator", default=",", help="CSV field separator (default: ,; '\\t' for a tab)")
    src.add_argument("--val", help="a CSV of validation pairs (columns as --data's), instead of a --val-frac split")
    src.add_argument("--val-frac", type=float, default=0.1, help="share of --data kept for validation (default 0.1)")
    src.add_argument("--val-max", type=int, default=5000, help="at most this many validation pairs (default 5000)")
    src.add_argument("--skip-bad", action="store_true", help="skip rows with a missing or unreadable image or no caption")
    src.add_argument("--workers", type=int, default=2, help="processes decoding images in the background (default 2)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=sorted(mc.PRESETS), help="model shape (default: tiny)")
    m.add_argument("--init", help="start from these weights (our checkpoint, or a CLIP folder in Hugging Face's or "
                   "open_clip's layout); their shape replaces --preset")
    m.add_argument("--objective", default="contrastive", choices=mc.OBJECTIVES,
                   help="contrastive (CLIP), or bow: predict the caption's bag of words from the image, "
                        "the paper's baseline (an ablation; no text tower, no retrieval)")
    m.add_argument("--tokenizer", help="a tokenizer file for bpe.load; default: train one on the captions")
    m.add_argument("--template", action="append", help="a prompt template with {} for the label, for zero-shot "
                   "evaluation and kept for zeroshot.py; repeat to ensemble (default: five of the form 'a photo of a {}')")
    m.add_argument("--labels-file", help="labels kept in the checkpoint for zeroshot.py, one per line (default: the "
                   "validation pairs' labels)")
    m.add_argument("--vocab-size", type=int, help="vocabulary size when training the tokenizer")
    s = p.add_argument_group("model shape, on top of --preset (a new model only)")
    s.add_argument("--model-config", metavar="FILE.json", help="a JSON object of any of the fields below, "
                   'e.g. {"image_size": 48, "vision_layers": 4}; the flags below change it further')
    for name in SHAPE_FIELDS:
        kind = dict(choices=sorted(mc.ACTIVATIONS)) if name == "activation" else dict(type=int)
        note = {"text_layers": " (0: a bag of words, the CLIP paper's Figure 2 text encoder)"}.get(
            name, " (0: 4 x the width)" if name.endswith("mlp_width") else "")
        s.add_argument("--" + name.replace("_", "-"), **kind, help=f"default: the preset's{note}")
    o = p.add_argument_group("optimization")
    for f in dataclasses.fields(TrainConfig):
        if f.type is bool:                              # --random-crop / --no-random-crop
            o.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                           help=f"default {f.default}")
        else:
            o.add_argument("--" + f.name.replace("_", "-"), type=f.type, help=f"default {f.default}")
    o.add_argument("--grad-checkpointing", action="store_true",
                   help="keep only each block's input and recompute it in the backward: less memory, ~1/3 more compute")
    o.add_argument("--device", choices=["cpu", "gpu"], help="default: $MINICLIP_DEVICE or cpu")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--out", help="checkpoint path (default: the --resume file, else checkpoints/tiny.npz)")
    c.add_argument("--resume", help="continue the run saved in this checkpoint")
    c.add_argument("--stop-at", type=int, help="save and stop after this step (the run can be resumed)")
    return p.parse_args(argv)


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)         # a log piped to a file arrives line by line
    args = parse_args(argv)
    mc.cpu_settings()
    group = None
    try:
        group = mpi_group()
        if group and group.rank:
            sys.stdout = open(os.devnull, "w")          # only process 0 prints
        return run_training(args, group)
    except GroupError as e:                             # every process raised it: process 0 reports it
        if (group.rank if group else launcher_rank()) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (UserError, ValueError, OSError) as e:      # OSError: a checkpoint or log that cannot be written
        print(f"error: {e}" if group is None else f"error on process {group.rank}: {e}", file=sys.stderr)
        if group:
            abort(group)                                # the others may be waiting for this one: end them all
        return 1
    except KeyboardInterrupt:
        print("interrupted twice: stopped without saving; the last checkpoint is as it was", file=sys.stderr)
        return 130
    except Exception:
        if group:                                       # a bug, perhaps on this process only
            traceback.print_exc()
            abort(group)
        raise


if __name__ == "__main__":
    sys.exit(main())
