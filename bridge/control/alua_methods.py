"""Control methods for ALUA and path events: ``alua.show``, ``alua.set``, ``port.down``,
``port.up`` (bridge/scsi/ports.py holds the model, bridge/scsi/alua.py the states).

Registered in methods.METHODS like every other method (methods.py imports this module).
"""

from __future__ import annotations

import logging
from typing import Any

from bridge.scsi.alua import parse_state
from bridge.scsi.ports import change_states, port_down, port_up

from .jsonrpc import INVALID_PARAMS, NOT_FOUND, RpcError, param
from .methods import Control, method

log = logging.getLogger(__name__)


def _group(ctl: Control, key: str):
    try:
        return ctl.target.ports.group(key)
    except KeyError:
        raise RpcError(NOT_FOUND, f"no port group {key!r} (alua.show lists them)") from None


def _port(ctl: Control, key: str):
    try:
        return ctl.target.ports.port(key)
    except KeyError:
        raise RpcError(NOT_FOUND, f"no target port {key!r} (alua.show lists them)") from None


@method("alua.show", help="target port groups: id, access state, ports (relative id, "
                          "attachment, up/down, I_T nexuses)")
async def alua_show(ctl: Control, p: dict[str, Any]) -> Any:
    return ctl.target.ports.describe()


@method("alua.set", param("group", str, help="port group name or id"),
        param("state", str, help="active/optimized | active/non-optimized | standby | "
                                  "unavailable | offline | transitioning"),
        help="set a port group's access state (an implicit transition: every I_T nexus gets "
             "ASYMMETRIC ACCESS STATE CHANGED)", mutating=True)
async def alua_set(ctl: Control, p: dict[str, Any]) -> Any:
    group = _group(ctl, p["group"])
    try:
        state = parse_state(p["state"])
    except ValueError as e:
        raise RpcError(INVALID_PARAMS, f"state: {e}") from None
    change_states(ctl.target, {group: state})
    log.warning("control: port group %s is %s", group.name, state.label)
    return ctl.target.ports.describe()


@method("port.down", param("port", str, help="relative target port id or attachment label"),
        help="take a target port down as a failed link: its I_T nexuses are lost and every "
             "command on it fails with the transport's link-loss code", mutating=True)
async def port_down_method(ctl: Control, p: dict[str, Any]) -> Any:
    port = _port(ctl, p["port"])
    port_down(ctl.target, port)
    return ctl.target.ports.describe()


@method("port.up", param("port", str, help="relative target port id or attachment label"),
        help="bring a target port back up (its nexuses see I_T NEXUS LOSS OCCURRED)",
        mutating=True)
async def port_up_method(ctl: Control, p: dict[str, Any]) -> Any:
    port = _port(ctl, p["port"])
    port_up(port)
    return ctl.target.ports.describe()
