"""Rounds through secure aggregation: blindtune's train messages in the format Flower's SecAgg+ speaks.

The protocol itself, as configured, is `blindtune.privacy.secagg`: the server runs Flower's own
`SecAggPlusWorkflow` for each round and the clients Flower's own `secaggplus_mod`; this module only
adapts blindtune's messages to the legacy FitIns/FitRes format they speak:

- server (`secure_round`): the workflow asks a legacy `Strategy` for one FitIns per client (the
  global adapter as ordered arrays, and blindtune's round instructions plus the adapter's names as
  JSON in the FitIns config), runs setup, key sharing, masked collection and unmasking, and hands the
  strategy the unmasked example-weighted mean, which becomes the new global adapter;
- client (`client_mods`): `secaggplus_mod` answers the protocol stages itself and, in the collection
  stage, calls `adapter_fitins_mod`, which turns the FitIns back into blindtune's train message, lets
  the method train as usual, and turns its reply into a FitRes. `secaggplus_mod` then quantises and
  masks the adapter and *removes* the plain arrays: the server receives only masked integers, the
  client's metrics (loss, example count, epsilon) and the protocol's keys and ciphertexts.

Every message the workflow exchanges is recorded in the run's ledger. What the server cannot do in
this mode: screen individual updates (norm outliers, NaN), or aggregate other than by a weighted mean
(FLoRA's stacking); values are clipped to +-`clipping_range` and quantised (see `SecAggConfig`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from blindtune.federation.grids import DelegatingGrid
from blindtune.federation.ledger import Direction, Ledger
from blindtune.federation.records import RecordKey, arrays, number, tensors_to_record
from blindtune.federation.rounds import Exchange, TooFewClientsError
from blindtune.models.adapters import AdapterState
from blindtune.privacy.config import SecAggConfig
from blindtune.privacy.secagg import protocol_mod, workflow

log = logging.getLogger(__name__)

INSTRUCTIONS = "blindtune.instructions"  # the round's ConfigRecord, as JSON
SENT_NAMES = "blindtune.adapter_names"  # names of the arrays in FitIns.parameters, in order
RETURNED_NAMES = "blindtune.returned_names"  # names the client must send back, in order
_FITINS_PARAMETERS = "fitins.parameters"


# ---- server side -------------------------------------------------------------------------------


class LedgerGrid(DelegatingGrid):
    """A Grid that records every message and reply of one round in the run's ledger."""

    def __init__(self, inner: Grid, ledger: Ledger, round_number: int) -> None:
        super().__init__(inner)
        self._ledger = ledger
        self._round = round_number

    def outgoing(self, messages: list[Message]) -> list[Message]:
        for message in messages:
            self._ledger.record(Direction.TO_CLIENTS, _countable(message.content), self._round)
        # Each node gets its own copy of the content, as over any real transport: the workflow sends one
        # RecordDict to every node and secaggplus_mod edits what it receives, which an in-process grid
        # (passing objects, not bytes) would otherwise let one node do to the others' messages.
        return [
            Message(
                copy.deepcopy(message.content),
                dst_node_id=message.metadata.dst_node_id,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
            )
            for message in messages
        ]

    def incoming(self, replies: list[Message]) -> None:
        for reply in replies:
            if not reply.has_error():
                self._ledger.record(Direction.TO_SERVER, _countable(reply.content), self._round)


def _countable(content: RecordDict) -> RecordDict:
    """`content` without empty lists in its config records (0 bytes, which Flower 1.41 cannot count)."""
    countable = RecordDict()
    for name, record in content.items():
        if isinstance(record, ConfigRecord) and any(isinstance(v, list) and not v for v in record.values()):
            record = ConfigRecord({k: v for k, v in record.items() if not (isinstance(v, list) and not v)})
        countable[name] = record
    return countable


@dataclass
class _OneRound(Strategy):
    """The legacy Strategy the workflow consults: FitIns for every node, and it keeps the aggregate."""

    grid: Grid
    node_ids: list[int]
    fitins: FitIns
    results: list[tuple[ClientProxy, FitRes]] = field(default_factory=list)
    aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(GridClientProxy(node_id, self.grid, 0), self.fitins) for node_id in self.node_ids]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Any]]:
        # SecAggPlusWorkflow has already unmasked the weighted mean into every result's parameters.
        self.results = list(results)
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        return None


def _to_arrays(state: AdapterState, names: list[str]) -> list[np.ndarray]:
    return [state[name].detach().to("cpu").float().numpy() for name in names]


def secure_round(
    exchange: Exchange,
    global_state: AdapterState,
    returned_names: list[str],
    instructions: ConfigRecord,
    round_number: int,
    min_replies: int,
    config: SecAggConfig,
) -> tuple[AdapterState, dict[int, RecordDict]]:
    """One round through SecAgg+: the clients' example-weighted mean of `returned_names`, and each
    client's reply as the server sees it (its metrics only)."""
    nodes = exchange.node_ids()
    if len(nodes) < 2:
        raise TooFewClientsError("secure aggregation needs at least 2 clients")
    sent_names = list(global_state)
    fitins = FitIns(
        parameters=ndarrays_to_parameters(_to_arrays(global_state, sent_names)),
        config={
            INSTRUCTIONS: json.dumps(dict(instructions)),
            SENT_NAMES: json.dumps(sent_names),
            RETURNED_NAMES: json.dumps(returned_names),
        },
    )
    grid = LedgerGrid(exchange.grid, exchange.ledger, round_number)
    strategy = _OneRound(grid=grid, node_ids=nodes, fitins=fitins)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(fitins.parameters, True)
    workflow(config)(grid, context)

    answered = {int(proxy.node_id): fitres for proxy, fitres in strategy.results}
    for node_id in set(nodes) - set(answered):
        exchange.fail(round_number, node_id, "dropped out of secure aggregation")
    if strategy.aggregate is None or len(answered) < min_replies:
        raise TooFewClientsError(
            f"round {round_number}: secure aggregation completed with {len(answered)} of {len(nodes)} clients, "
            f"{min_replies} required"
        )
    aggregate = parameters_to_ndarrays(strategy.aggregate)
    if len(aggregate) != len(returned_names):
        raise ValueError(f"secure aggregate has {len(aggregate)} arrays, expected {len(returned_names)}")
    mean = {
        name: torch.from_numpy(np.asarray(array, dtype=np.float32)).to(global_state[name].dtype)
        for name, array in zip(returned_names, aggregate, strict=True)
    }
    replies = {
        node_id: RecordDict({RecordKey.METRICS: MetricRecord(_numeric(fitres.metrics))})
        for node_id, fitres in answered.items()
    }
    return mean, replies


def _numeric(metrics: Mapping[str, Any]) -> dict[str, int | float | list[int] | list[float]]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ---- client side -------------------------------------------------------------------------------


def adapter_fitins_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Translate SecAgg+'s FitIns into blindtune's train message, and the method's reply into a FitRes."""
    if message.metadata.message_type != MessageType.TRAIN or _FITINS_PARAMETERS not in message.content:
        return call_next(message, context)
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    sent_names = json.loads(str(fitins.config[SENT_NAMES]))
    returned_names = json.loads(str(fitins.config[RETURNED_NAMES]))
    received = parameters_to_ndarrays(fitins.parameters)
    state = {name: torch.from_numpy(np.array(array)) for name, array in zip(sent_names, received, strict=True)}
    message.content = RecordDict(
        {
            RecordKey.ADAPTER: tensors_to_record(state),
            RecordKey.INSTRUCTIONS: ConfigRecord(json.loads(str(fitins.config[INSTRUCTIONS]))),
        }
    )
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    trained = arrays(reply.content, RecordKey.ADAPTER)
    if sorted(trained) != sorted(returned_names):
        raise ValueError("the trained adapter's names differ from those secure aggregation expects")
    metrics: dict[str, Any] = _numeric(dict(reply.content.metric_records[RecordKey.METRICS]))
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters(_to_arrays(trained, returned_names)),
        num_examples=int(number(reply.content, RecordKey.METRICS, "num_examples")),
        metrics=dict(metrics),
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def client_mods(config: SecAggConfig) -> list[Mod]:
    """The ClientApp train mods: SecAgg+ outermost, then the FitIns/FitRes translation."""
    if not config.enabled:
        return []
    return [protocol_mod(), adapter_fitins_mod]
