"""Step graphs: declare what one step reads, writes, routes and decodes; run it as few traces.

A method declares its needs once, as data::

    graph = StepGraph([
        Read("acts", "blocks.{l}.hook_resid_post", layers=[2, 3], model="trainable",
             batch="forget"),
        Read("ref_acts", "blocks.{l}.hook_resid_post", layers=[2, 3], model="base",
             batch="forget"),
        Route("routed_logits", "blocks.1.hook_resid_post", source="trainable", target="base",
              batch="forget"),
        Lens("lens_logits", "blocks.1.hook_resid_post", model="trainable", batch="forget"),
        Write("blocks.0.hook_attn_out", mode="zero", mask="token_mask", model="trainable",
              batch="retain"),
        Read("retain_logits", "unembed", model="trainable", batch="retain"),
    ])
    step = graph.compile({"trainable": model, "base": frozen_copy})   # once
    out = step({"forget": forget_batch, "retain": retain_batch})      # every step
    loss = mse(out["acts"], out["ref_acts"], out["forget/attention_mask"])

Compiling resolves every site on its model (`interventions.sites`), groups the work into one nnsight
trace per (model, batch) pair (plus one per `Route`, whose target runs a forward of its own),
orders the traces so that every value is read before it is written elsewhere, and makes each trace
stop right after the last site it needs. At run time a trace runs under ``torch.no_grad()`` unless
something it returns needs a gradient: a read on a model with trainable parameters (an
`interventions.frozen.FrozenView` has none), or a read downstream of a routed activation that
carries one. Reads with ``grad=False`` are detached.

A `Lens` decodes through the model's final norm and unembedding, or through frozen copies of them
made at compile time where they have trainable parameters: a lens loss moves the activation it
decodes, never the readout.

The result is a plain ``dict[str, Tensor]``: one entry per `Read`, `Route` and `Lens` name (a
``{l}`` template over several layers gives a ``[layer, ...]`` stack), plus
``"{batch}/attention_mask"`` for every batch that has one. Batches are token-id tensors, or
mappings or objects with an ``input_ids`` field, an optional ``attention_mask`` and any per-token
mask a `Write` names.

A `Route` whose site is a block's residual output (or input) runs the target from that block on:
the target's earlier blocks are skipped, not computed and overwritten. At other sites, and on
TransformerLens bridges, the routed value is written in place of the target's own.

Each trace is one call of `interventions.nnsight_backend.run_trace`; the nodes live in
`interventions.nodes`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from nnsight import Envoy
from torch import Tensor, nn

from interventions.frozen import FrozenView
from interventions.nnsight_backend import Edit, Point, as_envoy, forward_kwargs, run_trace
from interventions.nodes import Lens, Node, Read, Route, Translator, Write
from interventions.remote import Execution, as_remote, require_local
from interventions.sites import LayerSpec, ModelInfo, Site, describe_model, resolve_sites

__all__ = ["CompiledStep", "StepGraph"]


@dataclass(eq=False)
class _Op:
    """A planned action at one site of one trace, before points are merged."""

    site: Site
    read: tuple[str, bool] | None = None
    edit: Edit | None = None
    route_in: str | None = None
    """Key of a routed activation to write here, by skipping earlier blocks where possible."""
    consumes: tuple[str, ...] = ()


@dataclass(eq=False)
class _Trace:
    """One nnsight trace: a model on a batch (or a route's own forward of its target)."""

    model: str
    batch: str
    envoy: Envoy
    info: ModelInfo
    ops: list[_Op] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    reads: list[bool | None] = field(default_factory=list)
    consumes: set[str] = field(default_factory=set)
    """Keys this trace needs from earlier traces or from run-time values."""
    mask_fields: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Decode:
    """The lens half of a `Lens`: translator, final norm and unembedding.

    Locally the decode runs through ``norm`` and ``unembed``: the model's own final norm and
    unembedding when they are frozen, or frozen copies made once at compile time when they have
    trainable parameters, so that a loss on a lens prediction moves the representation it decodes
    and never the readout (tuned-lens' ``Unembed`` copies them for the same reason). A remote run
    decodes inside the trace through the server's modules (``remote_norm``, ``remote_unembed``);
    nothing is trained remotely.
    """

    norm: nn.Module
    unembed: nn.Module
    remote_norm: Envoy
    """Final norm as an envoy, so that calling it inside a remote trace runs the server's."""
    remote_unembed: Envoy
    translators: list[Translator | None]
    grad: bool | None

    def __call__(self, acts: list[Tensor]) -> list[Tensor]:
        return self._decode(acts, self.norm, self.unembed)

    def remote(self, acts: list[Tensor]) -> list[Tensor]:
        """Decode inside a trace, through the traced model's own modules."""
        return self._decode(acts, self.remote_norm, self.remote_unembed)

    def _decode(self, acts: list[Tensor], norm: Any, unembed: Any) -> list[Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.grad is not False):
            return [
                unembed(norm(act if translator is None else _translate(translator, act)))
                for act, translator in zip(acts, self.translators, strict=True)
            ]


def _translate(translator: Translator, act: Tensor) -> Tensor:
    """Apply a translator on the activation's device, in the translator's dtype, back in act's.

    A translator module (a tuned lens or probe loaded on the CPU, say) is moved to the
    activation's device the first time it meets it.
    """
    param = next(translator.parameters(), None) if isinstance(translator, nn.Module) else None
    if param is None:
        return translator(act)
    if param.device != act.device:
        assert isinstance(translator, nn.Module)
        translator.to(act.device)
    return translator(act.to(param.dtype)).to(act.dtype)


def _frozen(module: nn.Module) -> nn.Module:
    """`module` itself if nothing in it trains, else a frozen copy of it as it is now."""
    if not _is_trainable(module):
        return module
    return copy.deepcopy(module).requires_grad_(False)


@dataclass(eq=False)
class _Output:
    """How to assemble one result from the run's values."""

    name: str
    keys: list[str]
    stacked: bool
    decode: _Decode | None = None


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, Tensor):
        return batch if name == "input_ids" else None
    if isinstance(batch, Mapping):
        return batch.get(name)
    return getattr(batch, name, None)


def _is_trainable(module: nn.Module) -> bool:
    """Whether a module has parameters that train; a frozen view has none, whatever it wraps."""
    if isinstance(module, FrozenView):
        return False
    return any(p.requires_grad for p in module.parameters())


class StepGraph:
    """A declarative description of one step's reads, writes, routes and lenses.

    Args:
        nodes: `Read`, `Write`, `Route` and `Lens` nodes. Names must be unique and contain no "/".
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        names = [node.name for node in nodes if not isinstance(node, Write)]
        for name in names:
            if not name or "/" in name or names.count(name) > 1:
                raise ValueError(
                    f"Output name {name!r} must be non-empty, unique and free of '/' "
                    "(keys with '/' are reserved for masks)."
                )
        for node in nodes:
            if isinstance(node, Route) and node.source == node.target:
                raise ValueError(f"Route {node.name!r} has the same source and target model.")
        self.nodes = list(nodes)

    def compile(
        self, models: Mapping[str, nn.Module | Envoy], *, early_stop: bool = True
    ) -> CompiledStep:
        """Resolve sites and plan the traces for these models.

        Args:
            models: Model name to model (a torch module, possibly peft- or DDP-wrapped, an
                `interventions.frozen.FrozenView` of one, or an nnsight envoy). Plain modules are
                wrapped with nnsight once, here.
            early_stop: Stop each trace after its last site. Turn off where the forward must
                complete (e.g. for DDP's post-forward bookkeeping).

        Returns:
            A `CompiledStep`; call it with the batches every step.
        """
        return CompiledStep(self.nodes, models, early_stop=early_stop)

    def run(
        self,
        models: Mapping[str, nn.Module | Envoy],
        batches: Mapping[str, Any],
        values: Mapping[str, Tensor] | None = None,
        *,
        remote: Execution = False,
    ) -> dict[str, Tensor]:
        """Compile and run once (interactive use; compile once for a training loop).

        Args:
            models: As for `compile`.
            batches: As for `CompiledStep.__call__`.
            values: As for `CompiledStep.__call__`.
            remote: As for `CompiledStep.__call__`.

        Returns:
            The named results (see the module docstring).
        """
        return self.compile(models)(batches, values, remote=remote)


class CompiledStep:
    """A step graph bound to models: the fewest nnsight traces, in dependency order.

    Built by `StepGraph.compile`. ``traces`` lists ``(model, batch)`` in the order they run.
    """

    def __init__(
        self, nodes: list[Node], models: Mapping[str, nn.Module | Envoy], *, early_stop: bool
    ) -> None:
        self._envoys = {name: as_envoy(model) for name, model in models.items()}
        self._infos: dict[str, ModelInfo] = {}
        self._traces: dict[tuple[str, str, str], _Trace] = {}
        self._outputs: list[_Output] = []
        self._producers: dict[str, tuple[_Trace, Site]] = {}
        for node in nodes:
            self._add(node)
        self._order = self._sort()
        for trace in self._order:
            self._plan(trace)
        self._early_stop = early_stop
        self.traces = [(trace.model, trace.batch) for trace in self._order]

    def _info(self, model: str) -> ModelInfo:
        if model not in self._envoys:
            raise KeyError(
                f"The graph uses model {model!r}, but only {sorted(self._envoys)} were given."
            )
        if model not in self._infos:
            self._infos[model] = describe_model(self._envoys[model])
        return self._infos[model]

    def _sites(self, model: str, site: str, layers: LayerSpec | None = None) -> list[Site]:
        return resolve_sites(self._envoys[model], site, layers, self._info(model))

    def _trace(self, model: str, batch: str, route: str = "") -> _Trace:
        key = (model, batch, route)
        if key not in self._traces:
            info = self._info(model)
            self._traces[key] = _Trace(model, batch, self._envoys[model], info)
        return self._traces[key]

    def _read(self, trace: _Trace, site: Site, key: str, grad: bool | None) -> None:
        trace.ops.append(_Op(site, read=(key, grad is False)))
        trace.reads.append(grad)
        self._producers[key] = (trace, site)

    def _read_all(self, node: Read | Lens) -> tuple[list[Site], list[str]]:
        """Plan a Read's or Lens's reads; a single-site Read is stored under its own name."""
        trace = self._trace(node.model, node.batch)
        sites = self._sites(node.model, node.site, node.layers)
        keys = [f"act/{node.name}/{site.name}" for site in sites]
        if isinstance(node, Read) and node.layers is None:
            keys = [node.name]
        for site, key in zip(sites, keys, strict=True):
            self._read(trace, site, key, node.grad)
        return sites, keys

    def _add(self, node: Node) -> None:
        if isinstance(node, Read):
            _, keys = self._read_all(node)
            self._outputs.append(_Output(node.name, keys, node.layers is not None))
        elif isinstance(node, Write):
            trace = self._trace(node.model, node.batch)
            mask = node.mask
            if isinstance(mask, str):
                trace.mask_fields.add(mask)
                mask = f"mask/{node.batch}/{mask}"
            edit = Edit(node.mode, node.value, mask)
            consumes = (node.value,) if isinstance(node.value, str) else ()
            for site in self._sites(node.model, node.site, node.layers):
                if site.write_error:
                    raise ValueError(site.write_error)
                trace.ops.append(_Op(site, edit=edit, consumes=consumes))
        elif isinstance(node, Route):
            (site,) = self._sites(node.source, node.site)
            key = f"route/{node.name}"
            self._read(self._trace(node.source, node.batch), site, key, None)
            (target_site,) = self._sites(node.target, node.site)
            (output,) = self._sites(node.target, node.output)
            if output.order <= target_site.order:
                raise ValueError(
                    f"Route {node.name!r}: output {node.output!r} comes before {node.site!r}."
                )
            trace = self._trace(node.target, node.batch, route=node.name)
            trace.ops.append(_Op(target_site, route_in=key, consumes=(key,)))
            self._read(trace, output, node.name, None)
            self._outputs.append(_Output(node.name, [node.name], False))
        else:
            sites, keys = self._read_all(node)
            translator = node.translator
            translators: list[Translator | None] = []
            for site in sites:
                if not isinstance(translator, Mapping):
                    translators.append(translator)
                elif site.layer is not None and site.layer in translator:
                    translators.append(translator[site.layer])
                else:
                    raise KeyError(f"Lens {node.name!r} has no translator for {site.name}.")
            root = self._envoys[node.model]
            info = self._info(node.model)
            norm = root.get(info.prefix + info.arch.final_norm)
            unembed = root.get(info.prefix + info.arch.unembed)
            decode = _Decode(
                _frozen(norm._module),
                _frozen(unembed._module),
                norm,
                unembed,
                translators,
                node.grad,
            )
            self._outputs.append(_Output(node.name, keys, node.layers is not None, decode))

    def _sort(self) -> list[_Trace]:
        """Order traces so that every value a trace consumes is produced before it runs."""
        late = {output.name for output in self._outputs} - self._producers.keys()
        for trace in self._traces.values():
            for op in trace.ops:
                for key in op.consumes:
                    producer = self._producers.get(key)
                    if key in late:
                        raise ValueError(
                            f"A write uses {key!r}, which is a multi-layer Read or a Lens; writes "
                            "can use single-site Reads, Routes and run-time values."
                        )
                    if producer is None:
                        trace.consumes.add(key)  # a run-time value
                    elif producer[0] is not trace:
                        trace.consumes.add(key)
                    elif producer[1].order >= op.site.order:
                        raise ValueError(
                            f"{key!r} is read at {producer[1].name} and written at "
                            f"{op.site.name} of the same forward, which reaches them the other way."
                        )
        order: list[_Trace] = []
        pending = list(self._traces.values())
        while pending:
            ready = next(
                (
                    trace
                    for trace in pending
                    if all(
                        key not in self._producers or self._producers[key][0] in order
                        for key in trace.consumes
                    )
                ),
                None,
            )
            if ready is None:
                stuck = [(trace.model, trace.batch) for trace in pending]
                raise ValueError(f"The traces {stuck} consume each other's values (a cycle).")
            order.append(ready)
            pending.remove(ready)
        return order

    def _plan(self, trace: _Trace) -> None:
        """Merge a trace's ops into points in forward-pass order, choosing skips for routes."""
        if not trace.reads:
            raise ValueError(
                f"The graph writes to model {trace.model!r} on batch {trace.batch!r} but reads "
                "nothing there, so the writes could not change any result."
            )
        points: dict[tuple[str, str], Point] = {}
        for op in sorted(trace.ops, key=lambda op: op.site.order):
            if op.route_in is not None:
                skips = self._skip_paths(trace.info, op.site)
                if skips is not None:
                    dtype = next(trace.envoy._module.parameters()).dtype
                    for path in skips:
                        points[(path, "skip")] = Point(
                            trace.envoy.get(path), "output", skip=op.route_in, skip_dtype=dtype
                        )
                    continue
                op.edit = Edit("replace", op.route_in)
            key = (op.site.path, op.site.attr)
            if key not in points:
                envoy = trace.envoy.get(op.site.path)
                points[key] = Point(envoy, op.site.attr, op.site.index)
            if op.edit is not None:
                points[key].edits.append(op.edit)
            if op.read is not None:
                points[key].reads.append(op.read)
        trace.points = list(points.values())

    @staticmethod
    def _skip_paths(info: ModelInfo, site: Site) -> list[str] | None:
        """Blocks to skip so that ``site`` takes the routed value, or None if that cannot be done.

        Possible where a block's own output is the residual stream (the Hugging Face rows), for
        ``hook_resid_post`` of block l (skip blocks 0..l) and ``hook_resid_pre`` of l >= 1.
        """
        block = info.arch.layers + ".{l}"
        if info.arch.sites["hook_resid_post"] != (block, "output", None) or site.layer is None:
            return None
        kind = site.name.rsplit(".", 1)[1]
        last = {"hook_resid_post": site.layer, "hook_resid_pre": site.layer - 1}.get(kind, -1)
        if last < 0:
            return None
        return [info.prefix + block.format(l=layer) for layer in range(last + 1)]

    def __call__(
        self,
        batches: Mapping[str, Any],
        values: Mapping[str, Tensor] | None = None,
        *,
        remote: Execution = False,
    ) -> dict[str, Tensor]:
        """Run the traces on these batches and return the named results.

        Args:
            batches: Batch name to token ids, or to a mapping/object with ``input_ids``, optionally
                ``attention_mask`` and the mask fields that writes name.
            values: Run-time tensors that writes refer to by name.
            remote: Where the traces run (`interventions.remote`): locally by default, or on NDIF,
                a host, or nnsight's simulation, for a step that needs no gradient (reads on
                frozen models, ``grad=False`` reads, or any step under ``torch.no_grad()``).
                Remote results are detached; lenses are decoded on the server.

        Raises:
            interventions.remote.RemoteTrainingError: ``remote`` is set and a trace would need
                gradients (training cannot run remotely).

        Returns:
            Results by name, plus ``"{batch}/attention_mask"`` for each batch that has one.
        """
        where = as_remote(remote)
        store: dict[str, Tensor] = dict(values or {})
        out: dict[str, Tensor] = {}
        for trace in self._order:
            if trace.batch not in batches:
                raise KeyError(f"The graph needs batch {trace.batch!r}; got {sorted(batches)}.")
            batch = batches[trace.batch]
            attention_mask = _field(batch, "attention_mask")
            if attention_mask is not None:
                out[f"{trace.batch}/attention_mask"] = attention_mask
            for name in trace.mask_fields:
                mask = _field(batch, name)
                if mask is None:
                    raise KeyError(f"Batch {trace.batch!r} has no mask field {name!r}.")
                store[f"mask/{trace.batch}/{name}"] = mask
            missing = sorted(trace.consumes - store.keys())
            if missing:
                raise KeyError(f"No value named {missing[0]!r}: pass it in values=.")
            kwargs = forward_kwargs(trace.info.arch, _field(batch, "input_ids"), attention_mask)
            grad = torch.is_grad_enabled() and self._needs_grad(trace, store)
            if grad:
                require_local(remote, f"The trace of model {trace.model!r} on {trace.batch!r}")
            decodes = [] if where is None else self._decodes(trace)
            with torch.set_grad_enabled(grad):
                run_trace(
                    trace.envoy,
                    kwargs,
                    trace.points,
                    store,
                    stop=self._early_stop,
                    remote=where,
                    decodes=decodes,
                )
        for output in self._outputs:
            tensors = [store[key] for key in output.keys]
            if output.decode is not None and where is None:
                tensors = output.decode(tensors)
            out[output.name] = torch.stack(tensors) if output.stacked else tensors[0]
        return out

    def _decodes(self, trace: _Trace) -> list[tuple[list[str], Any]]:
        """The lenses whose reads ``trace`` makes, to decode inside it (remote runs)."""
        return [
            (output.keys, output.decode.remote)
            for output in self._outputs
            if output.decode is not None and self._producers[output.keys[0]][0] is trace
        ]

    @staticmethod
    def _needs_grad(trace: _Trace, store: Mapping[str, Tensor]) -> bool:
        """Whether a trace must record autograd: something it returns may need a gradient."""
        if any(grad is True for grad in trace.reads):
            return True
        if not any(grad is None for grad in trace.reads):
            return False
        if any(store[key].requires_grad for key in trace.consumes):
            return True
        return _is_trainable(trace.envoy._module)
