"""Selective softmax on a parameter store: HF-softmax (Zhang et al., AAAI 2018, "Accelerated Training
for Massive Classification via Dynamic Class Selection") and its random-sampling baseline.

The K x d classifier W lives in a :class:`paramserver.api.Store` (``WeightStore`` in-process, or
``RemoteStore`` for ZeroMQ servers; the head never asks which). One training step s of R ranks,
each holding b samples of a global batch of R*b (``begin_step(step, lr)``, ``loss = head(F,
labels)``, ``loss.backward()``, ``end_step``), collectives in :mod:`hfsoftmax.heads.collective`,
is :meth:`SelectiveSoftmax.plan` (1., an :class:`ActiveSet`), :meth:`~SelectiveSoftmax.fetch` (2.,
the rows) and :meth:`~SelectiveSoftmax.loss`, with the hook :meth:`~SelectiveSoftmax._on_grad` (3.):

1. The ranks all-gather their labels, and their features when the selection reads them, back into
   global batch order. ONE selection for the global batch: rank 0 sends the features and labels
   to ``store.query(F, candidates, labels, step=s)`` ("dot" metric for plain linear logits,
   "angular" for CosFace/ArcFace; the graph index searches from each sample's label, the others
   ignore the labels; ``step`` makes the query wait until update s-1 is in the index), then
   ``select_active``: every label of every rank first, then the strongest candidates, then a
   random fill from a Generator seeded by (seed, step), never by rank, to exactly M; it
   broadcasts the M ids. The random head and M == K need no query: every rank selects the same
   set itself. Each rank remaps its own labels into 0..M-1.
2. Rank r pulls a disjoint slice of ceil(M/R) active rows (``store.pull(ids, step=s)``: the
   server answers once step s-1 is applied) and the ranks all-gather them: Wa [M, d] on every
   rank, M rows off the server per step whatever R is. logits = ``Margin.logits`` (the very
   function of :class:`FullSoftmax`), in fp32 even under autocast; CE over M, the mean over the
   rank's b samples (DDP's average makes the backbone's gradient that of the global mean).
3. backward: a hook on Wa launches an asynchronous reduce-scatter of ``dL/dWa / R`` (and of a
   finiteness flag) and returns; rank r's slice of the sum is pushed for store step s with the
   step's lr, fixed at its forward (``store.push(ids_r, g_r, s, lr, client_id=r)``), from a background worker when
   ``pipeline`` (``store.pipeline``, the training default) or in ``end_step`` otherwise. The store
   collects the R disjoint slices of step s and applies one row-sparse SGD update of M rows.
   With fp16 loss scaling the gradient is divided by the scale (``begin_step(grad_scale=...)``),
   and a step whose gradient is not finite on any rank, or whose optimizer step the scaler skipped
   (``end_step(applied=False)``), pushes empty updates on every rank.
4. The next step's first store call waits for this rank's worker (so an error in a push stops the
   run at the next step, naming the server); ``flush()`` waits for it before a snapshot.

So R ranks with batch b train exactly like one process with batch R*b at every M (tested with gloo
ranks for the random head, HF with the exact and graph indexes, margins, adaptive M, pipelined and
not), and the server's work per step (one query, M rows pulled, M rows pushed and updated) does not
grow with R; only its number of requests does (R pulls and R pushes of M/R rows).

Shortcuts (documented, both exact): with M == K every class is active (no query; active =
0..K-1, labels unchanged); with the random index (head name "random", the Partial-FC-style
baseline) the classes besides the labels are a uniform random fill from the per-step Generator, so
no index query is needed (and resume is exact, which a stateful RandomIndex could not give).

Step numbering: the train loop counts steps from 0 (from the checkpoint's step on resume), the
store counts applied updates (``store.step``). At the first step this head reads ``store.step`` and
keeps ``offset = store.step - train_step`` (0 for a fresh store, and 0 after a resume that restored
the store snapshot of the checkpoint, since that snapshot's step IS the checkpoint's step); pushes
and pulls use ``train_step + offset``. A non-zero offset (a server reused from another run, a
checkpoint without a snapshot) is logged as a warning. ``WeightStore.restore`` (local, or the
server's on a ``restore`` request) drops its attached index and rebuilds it over the restored rows:
at once for a small W (up to 16 MiB), else in the background, the selection falling back to a random
fill until it is live (``fallback_queries`` in the index stats).

CPK and adaptive allocation (the paper's Sec. "Adaptive allocation"; its code never released it;
the objects are in :mod:`hfsoftmax.heads.cpk`).
Every P = ``cpk_every`` steps, on rank 0, on a probe of up to ``cpk_probe`` samples of the current
global batch (the M it chooses reaches every rank with the active set), the
class probabilities are computed in blocks of rows pulled from the store (no B x K tensor; eval
logits, i.e. without the margin): a running logsumexp and a running top-k of the logits over blocks.
With K <= ``cpk_sample`` over all K classes (exact); above, from a sample of classes (``cpk_sampled``
= 1 in the metrics; :meth:`CPKProbe.sampled_mass` states the estimator and its error): the
active set A that the current M selects this step plus a uniform sample of the other classes,
``cpk_sample`` rows per probe instead of K. Logged:

- ``cpk_exact``  = mean over probe samples of the probability mass of the exact top-M classes
  (sampled: a lower estimate, exact up to the partition estimate when each sample's top-M is in A);
- ``cpk_active`` = mean probability mass of the active set actually selected this step (selection
  quality: near ``cpk_exact`` for a good index, about M/K plus the label's mass for random).

Adaptive rule (``adaptive=True``), applied at each probe:

- M: with CPK(m) = mean over probe samples of the top-m probability mass (non-decreasing in m),
  ``M = min{m : CPK(m) >= tau_cp}``, clipped to [m_min, min(m_max, K)] (m_max if tau_cp is never
  reached).
- A batch with more unique labels than M (adaptive or not) grows M for that step only, so every
  label stays active (logged once, counted as ``m_grown_steps``).
- T (the index rebuild period): let c_start / c_end be the first / last ``cpk_active`` probed
  between two consecutive index builds going live. If ``c_start - c_end > cpk_drop`` (the selection
  went stale within the period), T halves, down to ``t_min``; otherwise (it held), T doubles, up to
  ``t_max``. T is set on the local store's IndexManager (``rebuild_every``); a remote store needs
  ``set_rebuild_every`` on the client (logged once when missing; T is still tracked and logged).

An exact probe costs one pass over all K rows (K*d floats from the store), a sampled one
``cpk_sample`` rows (at least |A| + cpk_sample / 4 when M approaches cpk_sample).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from paramserver.api import BadRequestError, Store
from paramserver.open import IndexSpec, StoreSpec, open_store

from ..config import ConfigError
from .base import ClassifierHead
from .collective import HeadComm
from .cpk import AdaptiveAllocation, CPKProbe, choose_num_active, next_rebuild_period  # noqa: F401 (re-exported)
from .margin import Margin, index_metric
from .pusher import Pusher

logger = logging.getLogger(__name__)

# Errors of a store that mean "the parameter server is gone" (RemoteStore raises TimeoutError naming
# the address; SyncTimeoutError is a TimeoutError too, naming the clients that did not push).
_LOST = (TimeoutError, ConnectionError)


class ParamServerLostError(ConnectionError):
    """The parameter store stopped answering; training cannot go on (the message names the server)."""


class StepGate:
    """One step's yes/no from the train loop (did the fp16 scaler let the optimizer step?), awaited by
    the push of that step, which may already be on the background worker when the loop decides."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._applied = False

    def set(self, applied: bool) -> None:
        self._applied = applied
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self) -> bool:
        self._event.wait()
        return self._applied


def _host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to ``device``: pinned and non-blocking on CUDA (a pageable copy blocks the host)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------- #
# Pure rules (testable on their own).

# --------------------------------------------------------------------------------------------- #
# The store.

def head_index_name(head_cfg: Any, num_classes: int) -> str:
    """The index a selective head uses: "random" for the random head, else ``head.index``, where
    "auto" means the hashing forest below 100K classes and the class-neighbour graph from there on
    (``paramserver.index.default_index_name``: a forest rebuild at 1M classes takes minutes, and an
    IVF scan per feature costs several times the step)."""
    if head_cfg.name == "random":
        return "random"
    if head_cfg.index == "auto":
        from paramserver.index import default_index_name
        return default_index_name(num_classes)
    return str(head_cfg.index)


def head_queries(head_cfg: Any, num_classes: int) -> bool:
    """Whether a selective head ever asks the store's class index for candidates: not the random head
    (a uniform fill keyed by the step), and not at M = K without adaptive allocation (every class is
    active). A store behind a head that never queries keeps no index (none to build every T steps)."""
    return (head_index_name(head_cfg, num_classes) != "random"
            and (bool(head_cfg.adaptive) or int(head_cfg.num_active) < num_classes))


def index_spec(head_cfg: Any, num_classes: int) -> IndexSpec:
    """The class index of a head's store, from its :class:`hfsoftmax.config.HeadConfig` ("none" for a
    head that never queries)."""
    if not head_queries(head_cfg, num_classes):
        return IndexSpec(name="none")
    return IndexSpec(name=head_index_name(head_cfg, num_classes), metric=index_metric(head_cfg.margin),
                     rebuild_every=int(head_cfg.rebuild_every), deterministic=head_cfg.deterministic,
                     ntrees=int(head_cfg.ntrees), search_k=int(head_cfg.search_k), nlist=int(head_cfg.nlist),
                     nprobe=int(head_cfg.nprobe), degree=int(head_cfg.degree))


def store_spec(cfg: Any, num_classes: int, num_clients: int = 1) -> StoreSpec:
    """The store of a run (K x ``model.feature_dim``, ``optim.*``'s SGD rule, seeded by ``train.seed``)."""
    o = cfg.optim
    return StoreSpec(num_classes=int(num_classes), dim=int(cfg.model.feature_dim), seed=int(cfg.train.seed),
                     momentum=float(o.momentum), weight_decay=float(o.weight_decay), nesterov=bool(o.nesterov),
                     sparse_momentum=o.sparse_momentum, num_clients=int(num_clients),
                     sync_timeout=float(cfg.store.timeout))


def resolve_token(token: str, token_file: str) -> Optional[str]:
    """The parameter server's shared secret: store.token, else store.token_file, else
    $PARAMSERVER_TOKEN (what train_hf.sh sets: a command line is visible to every user in ps)."""
    from paramserver.server import read_token_file
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    return os.environ.get("PARAMSERVER_TOKEN") or None


def make_store(cfg: Any, num_classes: int, info: Any) -> Store:
    """The parameter store of a selective head, from the full :class:`hfsoftmax.config.Config`.

    ``store.kind=local``: an in-process WeightStore with the optimizer of ``cfg.optim`` and, when the
    head queries (:func:`head_queries`), an IndexManager attached (first build synchronous up to 16 MiB of W, else in the background with a random
    fill until it is live; later ones in the background every
    ``head.rebuild_every`` steps). ``store.kind=remote``: a RemoteStore on the comma-separated shard
    addresses, client id = this rank; the servers must hold K = ``num_classes`` rows of
    d = ``model.feature_dim`` (checked, the error names the server) and, when the head queries, own a
    class index (``paramserver.py --index ... --metric ...``; checked too).

    Args:
        cfg: the Config.
        num_classes: K.
        info: hfsoftmax.dist.DistInfo (rank, world_size).
    """
    d = int(cfg.model.feature_dim)
    kind = cfg.store.kind
    from paramserver.protocol import WIRE_DTYPES
    if cfg.store.wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"config key 'store.wire_dtype': unknown value '{cfg.store.wire_dtype}' "
                          f"(choose {' or '.join(WIRE_DTYPES)})")
    if kind == "local":
        if info.world_size > 1:
            raise ConfigError(f"store.kind=local keeps W inside one process, but this run has world_size="
                             f"{info.world_size} ranks: start a parameter server (paramserver/paramserver.py "
                             f"--num-clients {info.world_size}) and use store.kind=remote store.address=tcp://...")
        try:
            return open_store(store_spec(cfg, num_classes), index_spec(cfg.head, num_classes))
        except ValueError as e:   # an index option the index refuses: name it
            raise ConfigError(f"head: {e}") from None
    if kind == "remote":
        from paramserver.client import RemoteStore

        addresses = [a.strip() for a in cfg.store.address.split(",") if a.strip()]
        if not addresses:
            raise ConfigError("store.kind=remote needs store.address=tcp://host:port[,tcp://host:port...]")
        try:
            # The constructor asks every shard for its info and refuses a K, d or class range that
            # differs, naming the server address and both values.
            store = RemoteStore(addresses, num_classes, d, timeout=float(cfg.store.timeout),
                                token=resolve_token(cfg.store.token, cfg.store.token_file), client_id=int(info.rank),
                                wire_dtype=cfg.store.wire_dtype)
        except ValueError as e:
            raise ConfigError(f"{e} (this run: num_classes={num_classes}, model.feature_dim={d})") from None
        except _LOST as e:
            raise ParamServerLostError(f"parameter server {cfg.store.address} did not answer: {e}") from None
        infos = store.info()
        want = store_spec(cfg, num_classes).optimizer()
        for a, inf in zip(addresses, infos):
            have = inf.get("optimizer") or {}
            differ = {k: (have.get(k), v) for k, v in want.items() if k in have and have[k] != v}
            if differ and not cfg.store.allow_optimizer_mismatch:
                store.close()
                raise ConfigError(f"parameter server {a} runs SGD with "
                                  f"{', '.join(f'{k}={h!r}' for k, (h, _) in differ.items())}, this run's config has "
                                  f"{', '.join(f'optim.{k}={v!r}' for k, (_, v) in differ.items())}: restart the "
                                  f"server with the config's values, or pass store.allow_optimizer_mismatch=true")
            if differ:
                logger.warning("parameter server %s: SGD differs from the config (server, config): %s", a, differ)
        try:
            store.register()   # a restarted rank: the server drops its dead predecessor's pending push
        except _LOST as e:
            raise ParamServerLostError(f"parameter server {cfg.store.address} did not answer: {e}") from None
        if head_queries(cfg.head, num_classes):
            bare = [a for a, inf in zip(addresses, infos) if not inf.get("index")]
            if bare:
                store.close()
                raise ConfigError(f"parameter server {', '.join(bare)} has no class index, but head {cfg.head.name} "
                                 f"with num_active={cfg.head.num_active} < num_classes={num_classes} queries one: "
                                 f"start it with --index {head_index_name(cfg.head, num_classes)} --metric {index_metric(cfg.head.margin)} "
                                 f"--rebuild-every {cfg.head.rebuild_every}")
        return store
    raise ConfigError(f"unknown store.kind '{kind}' (choose local or remote)")


# --------------------------------------------------------------------------------------------- #
# The head.

@dataclass
class ActiveSet:
    """One step's plan (:meth:`SelectiveSoftmax.plan`): what :meth:`~SelectiveSoftmax.fetch` pulls and
    :meth:`~SelectiveSoftmax.loss` computes over."""
    ids: np.ndarray                  # [M] active class ids, every label of the global batch first
    target: np.ndarray               # [b] this rank's labels remapped into 0..M-1
    part: slice                      # this rank's slice of ids: what it pulls and pushes
    step: Optional[int]              # the store step whose rows it reads (None: the latest; evaluation)
    gathered: bool = False           # R > 1 ranks: the slices are all-gathered, gradients reduce-scattered
    probe: Optional[torch.Tensor] = None   # [P, d] this step's CPK probe (rank 0 / one process), else None
    wait_s: float = 0.0              # store wait spent planning and fetching


@dataclass
class _Ahead:
    """The next step's plan, made while this step computed (:meth:`SelectiveSoftmax.prefetch`)."""
    train_step: int                  # the step it plans
    labels: np.ndarray               # [b] this rank's labels of that step (the forward must see the same)
    plan: ActiveSet
    early: np.ndarray                # positions in plan.ids[plan.part] that this step does not update:
    rows: list                       # their rows, pulled by the worker at this step's store step ([rows])


@dataclass
class _Push:
    """What the push of one step needs, fixed at its forward (the worker may run it after the next
    step has begun)."""
    ids: np.ndarray                  # this rank's slice of the active ids
    step: Optional[int]              # the store step it updates
    lr: Optional[float]              # that step's lr
    dtype: np.dtype                  # the store's dtype
    scale: Any                       # fp16 loss scale to divide out (None: none)
    gate: Optional[StepGate]         # fp16: the scaler's decision for that step

class SelectiveSoftmax(ClassifierHead):
    """Softmax over M active classes chosen per batch (HF-softmax), W in a parameter store.

    Args:
        store: WeightStore or RemoteStore holding W [K, d].
        num_classes: K.
        feature_dim: d (must equal ``store.dim``).
        num_active: M (the starting M when ``adaptive``).
        margin, scale, margin_m: the logit rule, a :class:`~hfsoftmax.heads.margin.Margin`.
        index: index name; "random" = random-sampling baseline (no query, see module docstring).
        candidates: classes asked of the index per sample.
        cpk_every: P, probe CPK every P steps (0 = off).
        adaptive: adapt M and T from CPK (rule in the module docstring).
        tau_cp, m_min, m_max: target CPK and the range of M.
        rebuild_every: T at the start (the store's IndexManager setting).
        seed: seed of the per-step selection Generator.
        rank, world_size: this process (default: torch.distributed if initialised, else 0 / 1).
        shortcut_full: with M == K make every class active without querying.
        cpk_probe: samples of the batch used for a CPK probe.
        cpk_drop, t_min, t_max: the T rule (defaults 0.02, max(1, T // 8), 8 T).
        block_size: rows per block when scoring all K (CPK, topk).
        cpk_sample: classes a CPK probe scores: all K when K <= cpk_sample (exact), else the active
            set plus a uniform sample of the rest (:meth:`sampled_mass`).
        pipeline: push from a background worker (its own store connection) instead of in end_step.
        prefetch: with ``pipeline``, plan the next step from its labels while this step computes and
            pull the rows this step does not update ahead (:meth:`prefetch`; label-only plans).
        comm: the head's collectives (default: a new :class:`HeadComm` when world_size > 1).
    """

    def __init__(self, store: Store, num_classes: int, feature_dim: int, num_active: int, *, margin: str = "none",
                 scale: float = 64.0, margin_m: float = 0.35, index: str = "forest", candidates: int = 64,
                 cpk_every: int = 0, adaptive: bool = False, tau_cp: float = 0.9, m_min: int = 100,
                 m_max: int = 10000, rebuild_every: int = 100, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, shortcut_full: bool = True, cpk_probe: int = 64,
                 cpk_drop: float = 0.02, t_min: Optional[int] = None, t_max: Optional[int] = None,
                 block_size: int = 65536, pipeline: bool = False, comm: Optional[HeadComm] = None,
                 cpk_sample: int = 200_000, prefetch: bool = True) -> None:
        super().__init__(num_classes, feature_dim)
        self.rule = Margin(margin, scale, margin_m)
        if int(store.num_classes) != num_classes or int(store.dim) != feature_dim:
            raise ConfigError(f"SelectiveSoftmax: the store holds W of num_classes={store.num_classes} x "
                             f"dim={store.dim}, but the head has num_classes={num_classes} x "
                             f"feature_dim={feature_dim}")
        if not 1 <= num_active <= num_classes:
            raise ConfigError(f"head.num_active M={num_active} must lie in [1, num_classes={num_classes}]")
        if candidates < 1 or cpk_every < 0 or rebuild_every < 1 or cpk_probe < 1 or block_size < 1:
            raise ConfigError(f"need candidates >= 1, cpk_every >= 0, rebuild_every >= 1, cpk_probe >= 1, "
                             f"block_size >= 1; got {candidates}, {cpk_every}, {rebuild_every}, {cpk_probe}, "
                             f"{block_size}")
        if cpk_sample < 1:
            raise ConfigError(f"head.cpk_sample must be >= 1 (classes scored by a CPK probe), got {cpk_sample}")
        if adaptive and not (0.0 < tau_cp <= 1.0 and 1 <= m_min <= m_max):
            raise ConfigError(f"adaptive allocation needs 0 < tau_cp <= 1 and 1 <= m_min <= m_max, "
                             f"got tau_cp={tau_cp}, m_min={m_min}, m_max={m_max}")
        if adaptive and cpk_every == 0:
            raise ConfigError("head.adaptive=true needs head.cpk_every > 0 (CPK drives the allocation)")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = int(rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0))
        self.world_size = int(world_size if world_size is not None
                              else (torch.distributed.get_world_size() if dist_on else 1))
        self.store = store
        self.num_active = int(num_active)
        self.index_name = index
        self.metric = self.rule.metric
        self.candidates = int(candidates)
        self.rebuild_every = int(rebuild_every)
        self.seed = int(seed)
        self.shortcut_full = bool(shortcut_full)
        self.block_size = int(block_size)
        self.cpk = CPKProbe(num_classes, cpk_every, cpk_probe, cpk_sample, seed)
        self.adapt = (AdaptiveAllocation(tau_cp, m_min, m_max, rebuild_every, cpk_drop, t_min, t_max)
                      if adaptive else None)
        # Step state: the train step and lr of begin_step; store step = train step + offset.
        self._train_step: Optional[int] = None
        self._lr: Optional[float] = None
        self._offset: Optional[int] = None
        self._forwarded = False      # a training forward happened this step (a push is owed)
        self._pushed = False
        self.last_active: Optional[np.ndarray] = None   # [M] ids of the last training forward
        # CPK: the last probe's figures, and its log partition [P] (exact or estimated)
        self._cpk: dict[str, float] = {}
        self._probe_lse: Optional[torch.Tensor] = None
        self._warned_remote_t = False
        # Multi-rank and pipelining state.
        self.comm = comm if comm is not None else HeadComm(self.rank, self.world_size)
        self.pipeline = bool(pipeline)
        self._worker: Optional[Pusher] = None
        # A remote store serialises its calls: the worker gets its own handle (its own sockets).
        self._push_store: Store = store.clone() if self.pipeline else store
        if self.pipeline:
            self._worker = Pusher(f"hfsoftmax-pusher-{self.rank}")
        self.prefetch_ahead = bool(prefetch) and self.pipeline
        self._ahead: Optional[_Ahead] = None     # the next step's plan and early rows (prefetch)
        self._ahead_steps = 0                    # steps planned ahead since the last stats()
        self._job: Any = None                    # the push owed by end_step (not pipelined)
        self._grad_scale: Any = None             # fp16 loss scale of this step (begin_step)
        self._gate: Optional[StepGate] = None    # fp16: whether the scaler let this step's update through
        self._host_labels: Optional[torch.Tensor] = None   # this step's labels on the host (begin_step)
        self._side: dict[int, Any] = {}          # CUDA device index -> the stream gradients leave on
        self._wait_s, self._wait_steps = 0.0, 0  # exposed store wait since the last stats()
        self._staging: Optional[torch.Tensor] = None   # pinned host buffer (CUDA)
        self._staged: Any = None
        self._grown = 0                          # training steps whose M grew to the unique labels

    @classmethod
    def from_config(cls, cfg: Any, store: Store, num_classes: int, feature_dim: int, *, seed: int = 0,
                    rank: Optional[int] = None, world_size: Optional[int] = None,
                    pipeline: bool = False, prefetch: bool = True) -> "SelectiveSoftmax":
        """From a :class:`hfsoftmax.config.HeadConfig` (``name`` hf or random). M is capped at K."""
        if cfg.num_active > num_classes:
            logger.warning("head.num_active=%d exceeds num_classes=%d: using M = K (every class active)",
                           cfg.num_active, num_classes)
        rule = Margin.from_config(cfg)
        return cls(store, num_classes, feature_dim, min(int(cfg.num_active), num_classes), margin=rule.kind,
                   scale=rule.scale, margin_m=rule.m, index=head_index_name(cfg, num_classes), candidates=cfg.candidates,
                   cpk_every=cfg.cpk_every, cpk_sample=cfg.cpk_sample, adaptive=cfg.adaptive, tau_cp=cfg.tau_cp, m_min=cfg.m_min,
                   m_max=cfg.m_max, rebuild_every=cfg.rebuild_every, seed=seed, rank=rank, world_size=world_size,
                   pipeline=pipeline, prefetch=prefetch)

    # -- step protocol ------------------------------------------------------------------------
    def _lost(self, what: str, err: BaseException) -> ParamServerLostError:
        return ParamServerLostError(f"parameter server {self.store.name} lost during {what} at step "
                                    f"{self._train_step}: {err}")

    def begin_step(self, step: int, lr: float, grad_scale: Any = None, labels: Optional[torch.Tensor] = None) -> None:
        """Called by the train loop before the forward of ``step`` with that step's lr.

        ``grad_scale``: the loss scale of fp16 training (a GradScaler's scale, a float or a device
        tensor): the active rows' gradient is divided by it before it is pushed, and the update is
        applied only if ``end_step(applied=True)`` says the scaler let the optimizer step.
        ``labels``: this rank's labels on the host (the loader's), so that the forward need not copy
        the device labels back, which would wait for the whole backbone forward on a GPU."""
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"begin_step: lr must be finite and >= 0, got {lr}")
        if self._offset is None:
            try:
                store_step = int(self.store.step)
            except _LOST as e:
                raise self._lost("begin_step", e) from None
            self._offset = store_step - int(step)
            if self._offset:
                logger.warning("store is at step %d but training is at step %d: store steps are train step %+d",
                               store_step, step, self._offset)
        self._train_step, self._lr = int(step), float(lr)
        self._grad_scale = grad_scale
        self._gate = StepGate() if grad_scale is not None else None
        self._host_labels = labels if labels is not None and labels.device.type == "cpu" else None
        self._forwarded = self._pushed = False

    def end_step(self, step: int, applied: bool = True) -> None:
        """After the optimizer step: send this step's push (now when not pipelined; the background
        worker has it otherwise). An empty update is pushed if no gradient reached the active rows,
        or the synchronous store would wait for it forever. ``applied``: whether the optimizer step
        ran (False: an fp16 GradScaler skipped it; W then stays as it is too, with an empty update)."""
        if self._gate is not None:
            self._gate.set(bool(applied))   # releases the pipelined push waiting for the decision
        if self._forwarded and not self._pushed:
            logger.warning("step %d: no gradient reached the active rows; pushing an empty update", step)
            self._push(np.empty(0, dtype=np.int64), np.empty((0, self.feature_dim), dtype=np.float32))
            self._pushed = True
        job, self._job = self._job, None
        if job is not None:
            t0 = time.perf_counter()
            job()
            self._wait_s += time.perf_counter() - t0
        self._forwarded = False

    def flush(self) -> None:
        """Wait until every push of this rank reached the store (before a snapshot, at the end)."""
        if self._worker is not None:
            self._worker.wait()

    @property
    def store_step(self) -> int:
        if self._train_step is None or self._offset is None:
            raise RuntimeError("SelectiveSoftmax: call head.begin_step(step, lr) before a training forward")
        return self._train_step + self._offset

    def _push(self, ids: np.ndarray, grads: np.ndarray, step: Optional[int] = None, store: Optional[Store] = None,
              lr: Optional[float] = None) -> None:
        """Push this rank's row gradients for store step ``step`` with that step's ``lr`` (default: the
        current step and lr). A background push passes both: by the time it runs, the training thread
        may have begun the next step, whose lr differs."""
        try:
            (store or self.store).push(ids, grads, self.store_step if step is None else step,
                                       self._lr if lr is None else lr, client_id=self.rank)
        except _LOST as e:
            raise self._lost("push", e) from None

    # -- selection ----------------------------------------------------------------------------
    def _rng(self, train_step: Optional[int] = None) -> np.random.Generator:
        # Keyed by (seed, train step) only, not by rank: every rank (and one process with the global
        # batch) draws the same fill, and a resume selects the same classes.
        return np.random.default_rng([self.seed, (self._train_step if train_step is None else train_step) or 0])

    def select(self, feats: Optional[np.ndarray], labels: np.ndarray, num_active: int,
               step: Optional[int] = None, train_step: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Active ids [M] (labels first) and labels remapped into 0..M-1, for features [B, d].

        ``step``: the store step whose rows the index must reflect (the query waits for it);
        ``train_step``: the step whose fill to draw (default: the current one)."""
        from paramserver.index import select_active

        K = self.num_classes
        if num_active == K and self.shortcut_full:
            return np.arange(K, dtype=np.int64), labels.astype(np.int64)
        if self.index_name == "random":
            cand_ids = np.empty(0, dtype=np.int64)
            cand_scores = np.empty(0, dtype=np.float32)
        else:
            kw = {} if step is None else {"step": step}
            try:
                cand_ids, cand_scores = self.store.query(feats, min(self.candidates, K), labels=labels, **kw)
            except _LOST as e:
                raise self._lost("query", e) from None
        return select_active(cand_ids, cand_scores, labels, num_active, K, self._rng(train_step))

    def _needs_features(self, probe: bool) -> bool:
        """Whether the selection reads features (identical on every rank: decides a collective)."""
        return probe or (self.index_name != "random"
                         and (self.adapt is not None or self.num_active < self.num_classes or not self.shortcut_full))

    # -- forward ------------------------------------------------------------------------------
    def _pull(self, ids: np.ndarray, step: Optional[int]) -> np.ndarray:
        try:
            return self.store.pull(ids, step=step)
        except _LOST as e:
            raise self._lost("pull", e) from None

    def _to_device(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """Host rows -> ``device``; on CUDA through a reused pinned staging buffer (non_blocking)."""
        t = torch.from_numpy(rows)
        if device.type != "cuda":
            return t
        n = t.shape[0]
        if self._staging is None or self._staging.shape[0] < n or self._staging.dtype != t.dtype:
            self._staging = torch.empty((max(n, 1), t.shape[1]), dtype=t.dtype, pin_memory=True)
            self._staged = None
        if self._staged is not None:
            self._staged.synchronize()        # the previous copy out of the buffer has finished
        self._staging[:n].copy_(t)
        with torch.cuda.device(device):       # the target's stream, not the current device's
            out = self._staging[:n].to(device, non_blocking=True)
            self._staged = torch.cuda.Event()
            self._staged.record(torch.cuda.current_stream(device))
        return out

    def _grow(self, M: int, n_unique: int, training: bool, train_step: Optional[int]) -> int:
        """M, or the global batch's number of unique labels if more: every label must be active
        (Partial FC keeps its positives too), so M grows for that step only, logged the first time
        and counted (m_grown_steps in the metrics)."""
        if M >= n_unique:
            return M
        if training:
            self._grown += 1
        (logger.info if self._grown <= 1 else logger.debug)(
            "step %s: M grows from %d to the batch's %d unique labels for this step (counted in "
            "m_grown_steps; raise head.num_active to avoid it)", train_step, M, n_unique)
        return n_unique

    # -- one step: plan (the active set), fetch (its rows), loss -------------------------------
    def plan(self, labels: np.ndarray, features: torch.Tensor, training: bool) -> ActiveSet:
        """The active set of this step (module docstring, 1.): every label of the global batch, then
        the index's candidates, then the random fill, to exactly M; this rank's labels remapped.
        On a CPK probe step (rank 0, or one process) the probe runs here and may choose M."""
        coll = training and self.comm.distributed            # the global-batch path (collectives)
        step = self.store_step if training else None
        wait = 0.0
        probe_step = training and self.cpk.due(self._train_step)
        need_feats = self._needs_features(probe_step)
        glab = self.comm.gather_batch(torch.from_numpy(labels)).numpy() if coll else labels       # [R*b]
        n_unique = int(np.unique(glab).size)
        feats32 = features.detach().float()
        central = coll and need_feats                        # rank 0 selects, the others receive
        active = remap_g = probe = None
        if not central or self.comm.rank == 0:
            gfeat = (self.comm.gather_batch(feats32) if central else feats32) if need_feats else None
            M = self.num_active
            feats_np = gfeat.cpu().numpy() if gfeat is not None else None
            pre = None       # (M, selection) a sampled probe was built on; reused if M stays
            if probe_step:
                probe = gfeat[: self.cpk.probe_size]                                      # [P, d]
                if self.cpk.sampled:
                    # The sampled probe scores the active set that the current M selects (the classes
                    # the index found); if the adaptive rule changes M, the step selects again below.
                    m0 = max(M, n_unique)
                    t0 = time.perf_counter()
                    pre = (m0, self.select(feats_np, glab, m0, step))
                    wait += time.perf_counter() - t0
                    M = self._probe_cpk(probe, step, active=pre[1][0])                    # adaptive: new M
                else:
                    M = self._probe_cpk(probe, step)                                      # adaptive: new M
            M = self._grow(M, n_unique, training, self._train_step)
            if pre is not None and pre[0] == M:
                active, remap_g = pre[1]
            else:
                t0 = time.perf_counter()
                active, remap_g = self.select(feats_np, glab, M, step)                    # [M], [R*b]
                wait += time.perf_counter() - t0
        elif need_feats:
            self.comm.gather_batch(feats32)                   # rank 0's gather needs every rank
        if central:
            active, self.num_active = self.comm.broadcast_ids(active, self.num_active)
        # This rank's labels in 0..M-1: its positions r, r+R, ... of the global remapping, or (a rank
        # that received the set) searched in it (active holds every label of the global batch).
        if remap_g is None:
            order = np.argsort(active, kind="stable")
            remap_g = order[np.searchsorted(active, labels, sorter=order)]
            coll_remap = False                                       # already this rank's [b]
        else:
            coll_remap = coll
        plan = self._active_set(active, remap_g, coll_remap, coll, step)
        plan.probe, plan.wait_s = probe, wait
        return plan

    def _active_set(self, active: np.ndarray, remap: np.ndarray, global_remap: bool, coll: bool,
                    step: Optional[int]) -> ActiveSet:
        """The plan of ``active`` ids: this rank's labels in 0..M-1 (its positions r, r+R, ... of the
        global batch's remapping ``remap`` when ``global_remap``, else ``remap`` itself) and its slice."""
        remapped = remap[self.comm.rank::self.comm.world_size] if global_remap else remap           # [b]
        M = len(active)
        return ActiveSet(ids=active, target=np.ascontiguousarray(remapped, dtype=np.int64),
                         part=self.comm.my_slice(M) if coll else slice(0, M), step=step, gathered=coll)

    def fetch(self, plan: ActiveSet, features: torch.Tensor, ahead: Optional[_Ahead] = None
              ) -> tuple[torch.Tensor, np.dtype]:
        """The active rows Wa [M, d] on the features' device, in fp32 (fp64 for fp64 features) whatever
        the autocast: this rank pulls its slice (at the plan's store step; with ``ahead``, only the
        rows the previous step updated, the others were pulled while it computed) and, with R ranks,
        the slices are all-gathered. Returns (Wa, the store's dtype)."""
        t0 = time.perf_counter()
        mine = self._pull_rows(plan, ahead)                                              # [~M/R, d]
        plan.wait_s += time.perf_counter() - t0
        device, dtype = features.device, torch.promote_types(features.dtype, torch.float32)
        if plan.gathered:
            Wa = self.comm.gather_rows(self._to_device(mine, self.comm.device), len(plan.ids))
        else:
            Wa = self._to_device(mine, device)
        return Wa.to(device=device, dtype=dtype), mine.dtype

    def _pull_rows(self, plan: ActiveSet, ahead: Optional[_Ahead]) -> np.ndarray:
        """This rank's slice of the plan's rows [n, d] as of the plan's store step."""
        ids = plan.ids[plan.part]
        if ahead is None:
            return self._pull(ids, plan.step)
        late = np.ones(len(ids), dtype=bool)
        late[ahead.early] = False
        rows = self._pull(ids[late], plan.step)       # the rows the previous step updated (waits for it)
        out = np.empty((len(ids), rows.shape[1]), dtype=rows.dtype)
        out[late] = rows
        out[ahead.early] = ahead.rows[0]
        return out

    def _plans_ahead(self, train_step: int) -> bool:
        """Whether step ``train_step``'s plan can be made before its forward: from labels alone (the
        random head, no CPK probe that step, fixed M), with a worker to pull on. Identical on every rank."""
        return (self.prefetch_ahead and self.adapt is None and self.num_active < self.num_classes
                and not self._needs_features(self.cpk.due(train_step)))

    def prefetch(self, step: int, labels: torch.Tensor) -> None:
        """The design's step 5: called after this step's forward with the NEXT step's host labels (the
        loader's, a batch ahead). For a plan that needs only labels, make step ``step``'s plan now and
        let the worker pull, before this step's push, the rows this step does not update (a row-sparse
        update leaves them as they are); the forward of ``step`` then pulls only the rows this step
        updated, once its push has landed. The rows and the plan are those the forward would have
        made itself: results are bitwise the same (test). Every rank calls it at the same point."""
        self._ahead = None
        if (self._train_step is None or self._offset is None or step != self._train_step + 1
                or not self._forwarded or self.last_active is None or not self._plans_ahead(step)):
            return
        lab = labels.detach().to(torch.int64).numpy()                               # [b] host labels
        coll = self.comm.distributed
        glab = self.comm.gather_batch(torch.from_numpy(lab)).numpy() if coll else lab       # [R*b]
        if glab.size and (glab.min() < 0 or glab.max() >= self.num_classes):
            return                       # the forward of that step names the bad label
        store_step = step + self._offset
        M = self._grow(self.num_active, int(np.unique(glab).size), True, step)
        active, remap_g = self.select(None, glab, M, store_step, train_step=step)       # [M], [R*b]
        plan = self._active_set(active, remap_g, coll, coll, store_step)
        ids = plan.ids[plan.part]
        early = np.flatnonzero(~np.isin(ids, self.last_active))
        rows: list = []

        def pull_early() -> None:
            try:    # this step's rows (store step - 1): the step's own push is queued after this job
                rows.append(self._push_store.pull(ids[early], step=store_step - 1))
            except _LOST as e:
                raise self._lost("prefetch pull", e) from None

        assert self._worker is not None
        self._worker.submit(pull_early)
        self._ahead = _Ahead(train_step=step, labels=lab.copy(), plan=plan, early=early, rows=rows)

    def loss(self, features: torch.Tensor, Wa: torch.Tensor, target: torch.Tensor, plan: ActiveSet) -> torch.Tensor:
        """Mean cross-entropy of features [b, d] over the active rows Wa [M, d] (fp32 logits and margin),
        and on a probe step the active set's CPK mass."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self.rule.logits(features, Wa, target)                                      # [b, M] fp32
            if plan.probe is not None:
                self._probe_active(plan.probe, plan.ids, plan.step)
            return F.cross_entropy(logits, target)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the M active classes: :meth:`plan`, :meth:`fetch`, :meth:`loss`;
        the backward's hook on Wa (:meth:`_on_grad`) sends dL/dWa to the store.

        Training with R ranks: one active set for the global batch (module docstring); the loss is
        the mean over this rank's samples (DDP's average makes it the global mean)."""
        self.check_features(features)
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be [B={features.shape[0]}], got {tuple(labels.shape)}")
        training = torch.is_grad_enabled()
        wait = 0.0
        if training and self._worker is not None:
            wait += self._worker.wait()      # the previous push has left (its error, naming the server, if not)
        host = self._host_labels if training else None
        self._host_labels = None
        if host is None or host.shape != labels.shape:
            host = labels.detach().to("cpu")          # a host sync on an accelerator (library use)
        lab = host.to(torch.int64).numpy()                                          # [b]
        if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), "
                             f"got range [{lab.min()}, {lab.max()}]")
        ahead = None
        if training:                     # (an evaluation forward between two steps leaves it be)
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead.train_step != self._train_step:
                ahead = None             # not this step's: plan as usual (its early pull is harmless)
        if ahead is not None:
            if not np.array_equal(ahead.labels, lab):
                raise RuntimeError(f"SelectiveSoftmax: step {self._train_step} was prefetched for other labels "
                                   f"than its forward's (head.prefetch must get the labels the step trains on)")
            plan = ahead.plan
            self._ahead_steps += 1
        else:
            plan = self.plan(lab, features, training)
        Wa, store_dtype = self.fetch(plan, features, ahead)
        target = _host_to(torch.from_numpy(plan.target), features.device)          # [b] in 0..M-1
        if training:
            self.last_active = plan.ids
            self._forwarded = True
            self._wait_s += wait + plan.wait_s
            self._wait_steps += 1
            Wa.requires_grad_(True)
            Wa.register_hook(functools.partial(self._on_grad, _Push(
                ids=plan.ids[plan.part], step=plan.step, lr=self._lr, dtype=store_dtype,
                scale=self._grad_scale, gate=self._gate)))
        return self.loss(features, Wa, target, plan)

    def _on_grad(self, push: "_Push", grad: torch.Tensor) -> None:
        """The hook on Wa: grad [M, d] is this rank's mean-loss gradient. It only launches work: the
        reduce-scatter is asynchronous and the push is a job (the worker thread's, or end_step's)."""
        if self._pushed:
            raise RuntimeError(f"SelectiveSoftmax: step {self._train_step} was already pushed (one "
                               f"backward per forward and step; gradient accumulation is not supported)")
        g = grad.detach().float() if grad.dtype in (torch.float16, torch.bfloat16) else grad.detach()
        flag = (~torch.isfinite(g)).any().to(g.dtype)          # device scalar: no host sync
        if push.scale is not None:
            g = g / push.scale
        g = g / self.world_size if self.world_size > 1 else g
        # one process: g stays where it is (a CUDA -> host copy here would sync the backward)
        work, slice_sum, flags = self.comm.reduce_scatter_rows(g.to(self.comm.device) if self.comm.distributed
                                                               else g, flag)
        event = None
        if slice_sum.is_cuda:
            work, event, slice_sum, flags = self._grad_to_host(work, slice_sum, flags)
        self._pushed = True
        job = functools.partial(self._push_job, work, event, slice_sum, flags, push)
        if self._worker is not None:
            self._worker.submit(job)
        else:
            self._job = job

    def _grad_to_host(self, work: Any, slice_sum: torch.Tensor, flags: torch.Tensor
                      ) -> tuple[None, Any, torch.Tensor, torch.Tensor]:
        """CUDA: copy this rank's gradient slice and its flag into pinned host memory on a side stream,
        ordered after the reduce-scatter (or, in one process, after the kernels that computed them),
        and return (None, the copy's event, host slice, host flags). The pusher then waits on that
        event only, never on the training stream, which by then holds the rest of the backward, DDP's
        all-reduce and the optimizer step (a wait there would count GPU compute as ps_wait_ms)."""
        dev = slice_sum.device
        side = self._side.get(dev.index)
        if side is None:
            side = self._side[dev.index] = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            if work is not None:
                work.wait()                  # the side stream waits for the collective
            host = torch.empty(slice_sum.shape, dtype=slice_sum.dtype, pin_memory=True)
            host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(slice_sum, non_blocking=True)
            host_flags.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        slice_sum.record_stream(side)        # not reused by the training stream before the copy is done
        flags.record_stream(side)
        return None, event, host, host_flags

    def _push_job(self, work: Any, event: Any, slice_sum: torch.Tensor, flags: torch.Tensor, push: "_Push") -> None:
        """Wait for the gradient (a CUDA event of :meth:`_grad_to_host`, or a gloo reduce-scatter), then
        push this rank's slice of the summed gradient with its step's lr; or an empty update when any
        rank's gradient was not finite, or when the fp16 scaler skipped the optimizer step (the gate)."""
        if event is not None:
            event.synchronize()              # host copies done: slice_sum and flags are pinned host tensors
        elif work is not None:
            work.wait()
        finite = float(flags.item()) == 0
        applied = push.gate.wait() if push.gate is not None else True
        if not (finite and applied):
            if not finite:
                logger.warning("step %s: non-finite gradient of the active rows (fp16 overflow?); W is not "
                               "updated this step", push.step)
            else:
                logger.debug("step %s: the fp16 scaler skipped the optimizer step; W is not updated either",
                             push.step)
            ids, g = np.empty(0, dtype=np.int64), np.empty((0, self.feature_dim), dtype=push.dtype)
        else:
            ids, g = push.ids, np.ascontiguousarray(slice_sum.numpy().astype(push.dtype, copy=False))
        self._push(ids, g, push.step, self._push_store, push.lr)

    def scores_block(self, features: torch.Tensor, start: int, end: int, step: Optional[int] = None) -> torch.Tensor:
        """Scores [B, end - start] of classes [start, end) (eval logits, no margin), rows pulled now
        (after store step ``step`` when given)."""
        self.check_features(features)
        if not 0 <= start < end <= self.num_classes:
            raise ValueError(f"scores_block: need 0 <= start < end <= {self.num_classes}, got [{start}, {end})")
        w = torch.from_numpy(self._pull(np.arange(start, end, dtype=np.int64), step))
        w = w.to(device=features.device, dtype=features.dtype)                   # [end - start, d]
        return self.rule.logits(features, w)

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K] scores assembled block by block (each block pulled separately); prefer topk at large K."""
        return torch.cat([self.scores_block(features, s, min(s + self.block_size, self.num_classes))
                          for s in range(0, self.num_classes, self.block_size)], dim=1)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int = 5, block_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores [B, k], class ids [B, k]) over all K, scored where the rows live (the store's
        score op, each shard over its rows in blocks of its own: ``block_size`` does not apply): only
        B x k numbers travel, whatever K (an identification over 10M classes pulls no row)."""
        self.check_features(features)
        try:
            _, top, ids = self.store.score(features.detach().cpu().numpy(), min(int(k), self.num_classes),
                                           scale=self.rule.eval_scale)
        except _LOST as e:
            raise self._lost("score", e) from None
        dtype = torch.promote_types(features.dtype, torch.float32)
        return torch.from_numpy(top).to(features.device, dtype), torch.from_numpy(ids).to(features.device)

    # -- CPK (heads/cpk.py) ---------------------------------------------------------------------
    def _score(self, step: Optional[int]) -> Callable[[np.ndarray, Optional[np.ndarray], int],
                                                       tuple[np.ndarray, np.ndarray]]:
        """The store's score op at store step ``step`` with this head's eval logits: (lse, top-k scores)."""
        def score(features: np.ndarray, ids: Optional[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
            try:
                lse, top, _ = self.store.score(features, k, ids=ids, scale=self.rule.eval_scale, step=step)
            except _LOST as e:
                raise self._lost("score", e) from None
            return lse, top
        return score

    def exact_mass(self, probe: torch.Tensor, k: int, step: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CPK over all K classes in blocks: (logsumexp [P], top-k probabilities [P, k] sorted desc)."""
        self.check_features(probe)
        return self.cpk.exact_mass(probe, self._score(step), k)

    def cpk_sample_ids(self, active: np.ndarray) -> np.ndarray:
        """This step's uniform class sample of a sampled probe (:meth:`CPKProbe.sample_ids`)."""
        return self.cpk.sample_ids(active, self._train_step or 0)

    def sampled_mass(self, probe: torch.Tensor, k: int, active: np.ndarray,
                     step: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`exact_mass` estimated around the active set (:meth:`CPKProbe.sampled_mass`)."""
        self.check_features(probe)
        return self.cpk.sampled_mass(probe, self._score(step), k, active, self._train_step or 0)

    def _probe_cpk(self, probe: torch.Tensor, step: Optional[int] = None,
                   active: Optional[np.ndarray] = None) -> int:
        """CPK of the exact top-M on the probe (estimated around ``active`` when K > cpk_sample); with
        adaptive allocation also choose M. Returns M."""
        adapt = self.adapt
        k = max(self.num_active, min(adapt.m_max, self.num_classes)) if adapt is not None else self.num_active
        self._probe_lse, curve = self.cpk.curve(probe, self._score(step), k, active, self._train_step or 0)
        if adapt is not None:
            new_m = adapt.choose_m(curve, self.num_classes)
            if new_m != self.num_active:
                logger.info("adaptive allocation at step %d: M %d -> %d (tau_cp %.3f)", self._train_step,
                            self.num_active, new_m, adapt.tau_cp)
            self.num_active = new_m
        self._cpk = {"cpk_exact": float(curve[self.num_active - 1]), "cpk_step": float(self._train_step),
                     "cpk_sampled": 1.0 if self.cpk.sampled else 0.0}
        return self.num_active

    def _probe_active(self, probe: torch.Tensor, active: np.ndarray, step: Optional[int]) -> None:
        """CPK of the selected active set on the probe, and the T rule when adaptive."""
        mass = self.cpk.active_mass(probe, self._score(step), active, self._probe_lse)
        self._cpk["cpk_active"] = mass
        if self.adapt is not None:
            self._adapt_rebuild_period(mass)

    def _index_stats(self) -> dict[str, Any]:
        try:
            return dict(self.store.stats().get("index") or {})
        except _LOST as e:
            raise self._lost("stats", e) from None

    def _adapt_rebuild_period(self, cpk_active: float) -> None:
        builds = self._index_stats().get("builds")
        if builds is None:
            return
        new_t = self.adapt.observe(cpk_active, builds, self.rebuild_every)
        if new_t != self.rebuild_every:
            self.rebuild_every = new_t
            self._apply_rebuild_every()

    def _apply_rebuild_every(self) -> None:
        try:
            self.store.set_rebuild_every(self.rebuild_every)
        except BadRequestError as e:           # no class index attached: T is tracked and logged only
            if not self._warned_remote_t:
                logger.warning("the adapted T=%d is logged but not applied: %s", self.rebuild_every, e)
                self._warned_remote_t = True
        except _LOST as e:
            raise self._lost("set_rebuild_every", e) from None

    # -- bookkeeping --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """num_active, rebuild_every, the last cpk_exact / cpk_active, and index_* stats if any."""
        out: dict[str, Any] = {"num_active": self.num_active, "rebuild_every": self.rebuild_every, **self._cpk}
        if self._grown:
            out["m_grown_steps"] = self._grown
        if self._wait_steps:
            # exposed parameter-server wait of this rank: its blocking query, pull and push calls
            out["ps_wait_ms"] = 1000.0 * self._wait_s / self._wait_steps
            self._wait_s, self._wait_steps = 0.0, 0
        if self._ahead_steps:
            out["planned_ahead_steps"] = self._ahead_steps
            self._ahead_steps = 0
        if self.index_name != "random":
            for k, v in self._index_stats().items():
                if isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and not math.isfinite(v)):
                    out[f"index_{k}"] = v
        return out

    def get_extra_state(self) -> dict[str, Any]:
        """The adaptive M and T travel in the head's state_dict (checkpoints)."""
        return {"num_active": self.num_active, "rebuild_every": self.rebuild_every}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.adapt is not None:   # a fixed M / T comes from the config, which may have been changed on resume
            self.num_active = int(state["num_active"])
            self.rebuild_every = int(state["rebuild_every"])
            self._apply_rebuild_every()

    def close(self) -> None:
        """Finish the pushes in flight; close the store (sockets, index builds) and the worker's handle."""
        if self._gate is not None and not self._gate.is_set():
            self._gate.set(False)            # a step that never reached end_step (an error) is not applied
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._push_store is not self.store:
            self._push_store.close()
        self.store.close()

    def extra_repr(self) -> str:
        return (f"K={self.num_classes}, d={self.feature_dim}, M={self.num_active}, margin={self.rule.kind}, "
                f"index={self.index_name}, rank={self.rank}/{self.world_size}")
