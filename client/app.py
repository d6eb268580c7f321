"""The Flower ClientApp that runs at each hospital site.

The handlers are thin: they find the site's YAML, parse the message, call the plain
functions of ``client.training``, check the reply against the model spec, write it
to the site's audit log, and send it. Only parameter tensors named by the model spec
and scalar metrics leave the site.

Which site a ClientApp serves comes from the node config:

- ``site-config``: path of the site YAML (deployment: ``unicon site start`` sets it);
- otherwise ``partition-id`` picks the n-th YAML (sorted by name) of the folder named
  by the run config's ``sites-dir`` (``flwr run`` simulation), or of the list given
  to ``create_client_app`` (``unicon simulate``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from client.audit import AuditLog, check_reply
from client.frozen_cache import FrozenCache
from client.privacy import DPConfig
from client.site_config import SiteConfig, find_site_files, load_site_config
from client.site_privacy import SiteDP
from client.training import (
    LocalTrainingError,
    StageRequest,
    evaluate_tasks,
    site_fisher,
    task_counts,
    train_local,
)
from unicon_model import wire
from unicon_model.log import ensure_logging, get_logger
from unicon_model.model import UniconModel
from unicon_model.serialization import build_model

logger = get_logger(__name__)


class SiteResolutionError(RuntimeError):
    """The node config does not say which site YAML this ClientApp serves."""


def resolve_site_file(context: Context, site_files: Sequence[Path] | None) -> Path:
    """Return the site YAML this ClientApp serves (see the module docstring)."""
    node_config = context.node_config
    if "site-config" in node_config:
        return Path(str(node_config["site-config"]))
    if "partition-id" not in node_config:
        raise SiteResolutionError(
            "the node config has neither 'site-config' nor 'partition-id'; start the SuperNode with "
            "--node-config 'site-config=\"/path/to/site.yaml\"' (unicon site start does this)"
        )
    partition = int(node_config["partition-id"])
    files = list(site_files or [])
    if not files:
        sites_dir = Path(str(context.run_config.get("sites-dir", "")))
        files = find_site_files(sites_dir) if sites_dir.is_dir() else []
        if not files:
            raise SiteResolutionError(
                f"run config sites-dir={str(sites_dir)!r} contains no site YAML files; point it at a folder "
                "of site YAMLs (unicon simulate writes one under its output folder)"
            )
    if partition >= len(files):
        raise SiteResolutionError(
            f"partition-id {partition} has no site: only {len(files)} site YAML files; run with "
            f"num-supernodes={len(files)}"
        )
    return files[partition]


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()}


def _to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for name in sorted(tensors):
        record[name] = Array(np.ascontiguousarray(tensors[name].detach().cpu().numpy()))
    return record


def _rebuild_model(
    site: SiteConfig, request: StageRequest, message: Message
) -> tuple[UniconModel, list[str]]:
    """Build the model of the spec from cached frozen groups plus the tensors received."""
    cache = FrozenCache(site.state_dir)
    content = message.content
    if wire.FROZEN in content.array_records:
        cache.store(_tensors(content.array_records[wire.FROZEN]), request.frozen_groups)
    state = cache.load(request.frozen_groups)
    trainable_names: list[str] = []
    if wire.TRAINABLE in content.array_records:
        received = _tensors(content.array_records[wire.TRAINABLE])
        trainable_names = sorted(received)
        state.update(received)
    model = build_model(request.model_spec)
    model.load_state_dict(state, strict=True)
    return model, trainable_names


_PATH_PATTERN = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"(),;]+")


def public_reason(text: str) -> str:
    """Return ``text`` with every file path replaced, for a reason that leaves the site.

    Messages written for the site's own staff name files; what goes to the server
    must not, so each absolute path becomes ``<path>`` (the site log keeps the original).
    """
    return _PATH_PATTERN.sub("<path>", text)


def _guarded(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Turn an exception in a handler into a generic error reply; details stay in the site log.

    Without this, Flower would send ``str(exception)`` to the server, which may name
    a file of the site and bypasses the reply check and the audit log.
    """

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as error:
            logger.exception(
                "%s failed at node %s: %s", message.metadata.message_type, context.node_id, error
            )
            reason = f"{type(error).__name__} at the site; the site log has the details"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)

    return wrapper


def _reply(
    message: Message,
    site: SiteConfig,
    request: StageRequest | None,
    arrays: dict[str, ArrayRecord],
    metrics: dict[str, float | int],
    reasons: dict[str, str],
    allowed_shapes: dict[str, tuple[int, ...]],
) -> Message:
    """Check, audit and build a reply; nothing outside the model spec leaves the site."""
    flat = {name: array.numpy() for record in arrays.values() for name, array in record.items()}
    check_reply(flat, allowed_shapes, metrics)
    AuditLog(site.state_dir).append(
        run_id=request.run_id if request else "-",
        stage=request.stage if request else "-",
        server_round=request.server_round if request else 0,
        message_type=message.metadata.message_type,
        arrays=flat,
        metrics=metrics,
    )
    content = RecordDict({wire.METRICS: MetricRecord(dict(metrics.items()))})
    for key, record in arrays.items():
        content[key] = record
    reasons = {key: public_reason(value) for key, value in reasons.items()}
    if reasons:
        content[wire.REASONS] = ConfigRecord(dict(reasons.items()))
    return Message(content=content, reply_to=message)


def create_client_app(
    site_files: Sequence[Path] | None = None, mods: Sequence[Mod] = ()
) -> ClientApp:
    """Create the ClientApp.

    Parameters
    ----------
    site_files : sequence of Path, optional
        Site YAMLs indexed by ``partition-id`` (simulation).
    mods : sequence of Flower mods
        Flower client mods wrapped around every handler, outermost first.
    """
    app = ClientApp(mods=list(mods))
    torch.set_num_threads(int(os.environ.get("UNICON_TORCH_THREADS", "1")))

    def load_site(context: Context) -> SiteConfig:
        ensure_logging()
        return load_site_config(resolve_site_file(context, site_files))

    @app.query("site_info")
    @_guarded
    def site_info(message: Message, context: Context) -> Message:
        site = load_site(context)
        tasks = [str(t) for t in message.content[wire.CONFIG].get("tasks", [])]  # type: ignore[union-attr]
        counts = task_counts(site, tasks)
        info = ConfigRecord(
            {"site": site.site, "cached-groups": FrozenCache(site.state_dir).hashes()}
        )
        content = RecordDict(
            {wire.SITE_INFO: info, wire.METRICS: MetricRecord(dict(counts.items()))}
        )
        # The counts are the only site data in this reply, so they go to the audit log too.
        AuditLog(site.state_dir).append(
            run_id="-",
            stage="-",
            server_round=0,
            message_type=message.metadata.message_type,
            arrays={},
            metrics=counts,
        )
        logger.info("site=%s reported data for %s", site.site, sorted(counts))
        return Message(content=content, reply_to=message)

    @app.train("stage")
    @_guarded
    def train(message: Message, context: Context) -> Message:
        site = load_site(context)
        request = StageRequest.from_config(message.content[wire.CONFIG])
        model, trainable_names = _rebuild_model(site, request, message)
        records = message.content.array_records
        reference = _tensors(records[wire.REFERENCE]) if wire.REFERENCE in records else None
        fisher = _tensors(records[wire.FISHER]) if wire.FISHER in records else None
        dp_config = DPConfig.from_mapping(site.privacy, site.source)
        dp = (
            SiteDP(site, request, dp_config, request.total_rounds)
            if dp_config is not None and dp_config.enabled
            else None
        )
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        if dp is not None:
            declined = dp.plan(
                num_train=task_counts(site, [request.task]).get(f"{request.task}.num-train", 0)
            )
            if declined is not None:
                logger.warning(
                    "site=%s stage=%s round=%d declined: %s",
                    site.site,
                    request.stage,
                    request.server_round,
                    declined,
                )
                return _reply(
                    message,
                    site,
                    request,
                    {},
                    {wire.NUM_EXAMPLES: 0, wire.DECLINED: 1},
                    {wire.DECLINED: declined},
                    shapes,
                )
        try:
            result = train_local(
                model, site, request, trainable_names, reference, fisher, dp_hook=dp
            )
        except LocalTrainingError as error:
            logger.error(
                "site=%s stage=%s round=%d: %s",
                site.site,
                request.stage,
                request.server_round,
                error,
            )
            return _reply(
                message,
                site,
                request,
                {},
                {wire.NUM_EXAMPLES: 0, wire.DECLINED: 1},
                {wire.DECLINED: str(error)},
                shapes,
            )
        metrics: dict[str, float | int] = {wire.NUM_EXAMPLES: result.num_examples, **result.metrics}
        if dp is not None:
            metrics.update(dp.record())
        logger.info(
            "site=%s stage=%s round=%d trained on %d examples: %s",
            site.site,
            request.stage,
            request.server_round,
            result.num_examples,
            {k: round(v, 4) for k, v in result.metrics.items()},
        )
        return _reply(
            message,
            site,
            request,
            {wire.TRAINABLE: _to_record(result.trainable)},
            metrics,
            result.undefined,
            shapes,
        )

    @app.query("fisher")
    @_guarded
    def fisher(message: Message, context: Context) -> Message:
        site = load_site(context)
        request = StageRequest.from_config(message.content[wire.CONFIG])
        model, _ = _rebuild_model(site, request, message)
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        if DPConfig.from_mapping(site.privacy, site.source) is not None:
            # A Fisher is computed without noise, so a DP site would spend privacy off its ledger.
            reason = "the site trains with differential privacy and sends no Fisher"
            logger.warning("site=%s stage=%s: %s", site.site, request.stage, reason)
            return _reply(
                message, site, request, {}, {wire.NUM_EXAMPLES: 0, wire.DECLINED: 1},
                {wire.DECLINED: reason}, shapes,
            )  # fmt: skip
        shared = model.trainable_sets(request.task, finetune_shared=True).shared
        values, count = site_fisher(model, site, request, shared)
        return _reply(
            message,
            site,
            request,
            {wire.FISHER: _to_record(values)},
            {wire.NUM_EXAMPLES: count},
            {},
            shapes,
        )

    @app.evaluate("tasks")
    @_guarded
    def evaluate(message: Message, context: Context) -> Message:
        site = load_site(context)
        request = StageRequest.from_config(message.content[wire.CONFIG])
        model, _ = _rebuild_model(site, request, message)
        metrics, undefined = evaluate_tasks(model, site, request)
        logger.info(
            "site=%s stage=%s evaluated: %s",
            site.site,
            request.stage,
            {k: round(v, 4) for k, v in metrics.items()},
        )
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        return _reply(message, site, request, {}, dict(metrics), undefined, shapes)

    return app


app = create_client_app()
