"""The Modbus TCP face of the gateway (pymodbus server): a fixed register map per camera slot.

Cameras take slots in the order given with ``--camera`` and then in the order their first verdict
arrives; slot ``k`` starts at holding register ``32 * k`` and at coil ``8 * k``. Any unit id is
answered. Input registers mirror the holding registers, discrete inputs mirror the coils (for PLCs
that read those function codes). Words are big-endian; 32-bit values are two registers, high word
first.

Holding registers (FC3 read; FC6/FC16 write **only** at offsets 3-4, anything else is refused with
exception 02, illegal data address)::

    +0      verdict code: 0 none yet, 1 PASS, 2 FAIL, 3 ERROR
    +1, +2  seq of the result on show (u32)
    +3, +4  Ack: the PLC writes the seq it has consumed (u32; handshake mode)
    +5      score x 1000 (u16, 65535 when absent or above 65.535)
    +6      threshold x 1000 (u16)
    +7, +8  frame_id (u32; 0xFFFFFFFF when not an integer)
    +9      latency x 10 (0.1 ms units, u16, saturates)
    +10,+11 PASS count   +12,+13 FAIL count   +14,+15 ERROR count (u32 each, results received)
    +16     watchdog: +1 per runtime heartbeat (wraps at 65536); a PLC that sees it stand still for
            longer than its own timeout must reject
    +17     backlog (results waiting behind the one on show)
    +18     overflows (results dropped because the backlog was full; wraps)
    +19     status bits: 0 healthy, 1 pass, 2 fail, 3 overflowed, 4 seq gap, 5 runtime stale,
            6 gateway starting (no heartbeat yet), 7 new result waiting for Ack
    +20     heartbeat age in ms (u16, saturates)
    +24..31 camera name, ASCII, 2 characters per register, high byte first, NUL padded

Coils (FC1; writes refused) per slot: +0 pass, +1 fail, +2 healthy, +3 overflowed, +4 new result
waiting for Ack.

Handshake: poll the block; when +1/+2 differ from what you wrote to +3/+4 (or status bit 7 is set),
use the result and write +1/+2 into +3/+4 with one FC16; the next result comes up.
"""
from __future__ import annotations

import math

BLOCK_REGISTERS = 32          # holding registers per camera slot
COILS_PER_SLOT = 8
R_VERDICT, R_SEQ, R_ACK, R_SCORE, R_THRESHOLD, R_FRAME_ID, R_LATENCY = 0, 1, 3, 5, 6, 7, 9
R_PASS_COUNT, R_FAIL_COUNT, R_ERROR_COUNT = 10, 12, 14
R_WATCHDOG, R_BACKLOG, R_OVERFLOWS, R_STATUS, R_HB_AGE = 16, 17, 18, 19, 20
NAME_OFFSET, NAME_REGISTERS = 24, 8
ACK_OFFSETS = (R_ACK, R_ACK + 1)
C_PASS, C_FAIL, C_HEALTHY, C_OVERFLOWED, C_WAITING = range(5)
VERDICT_NAMES = {0: "", 1: "PASS", 2: "FAIL", 3: "ERROR"}
READ_CODES = {1: "c", 2: "d", 3: "h", 4: "i", 23: "h"}
WRITE_CODES = {5: "c", 15: "c", 6: "h", 16: "h", 22: "h", 23: "h"}
_U16 = 0xFFFF


class ModbusFace:
    """Serves :class:`memseg_edge.gateway.state.GatewayState` to Modbus TCP clients (pymodbus' server,
    on the gateway's asyncio loop). Values are computed from the state at every request."""

    protocol = "modbus"

    def __init__(self, state, port: int, host: str = "127.0.0.1", slots: int = 8, log=print):
        self.state = state
        self.port = int(port)
        self.host = host
        self.slots = int(slots)
        self.log = log
        self.server = None
        self._task = None
        self._ack_regs: dict[str, list[int]] = {}
        self._warned: set[str] = set()

    def changed(self, camera: str | None) -> None:
        """Nothing to push: every request reads the state."""

    async def start(self) -> None:
        import asyncio

        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        n_regs = BLOCK_REGISTERS * self.slots
        n_bits = COILS_PER_SLOT * self.slots
        bits = [SimData(0, count=n_bits, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=n_regs, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(id=0, simdata=(bits, list(bits), regs, list(regs)), action=self._action)
        self.server = ModbusTcpServer(device, address=(self.host, self.port))
        self._task = asyncio.create_task(self.server.serve_forever())
        for _ in range(200):   # serve_forever binds asynchronously
            if self.server.transport is not None:
                break
            await asyncio.sleep(0.01)
        if self.port == 0 and self.server.transport is not None:
            self.port = self.server.transport.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
        if self._task is not None:
            self._task.cancel()

    # -- the register image -------------------------------------------------------------------------
    def slot_cameras(self) -> list[str]:
        cams = self.state.cameras
        for cam in cams[self.slots:]:
            if cam not in self._warned:
                self._warned.add(cam)
                self.log(f"warning: camera {cam} has no Modbus slot (--modbus-slots {self.slots}); OPC UA still serves it")
        return cams[:self.slots]

    def registers(self) -> list[int]:
        out = [0] * (BLOCK_REGISTERS * self.slots)
        age_ms = self.state.heartbeat_age() * 1000.0
        for k, cam in enumerate(self.slot_cameras()):
            v = self.state.view(self.protocol, cam)
            base = BLOCK_REGISTERS * k
            block = out[base:base + BLOCK_REGISTERS]
            block[R_VERDICT] = v.verdict_code
            block[R_SEQ:R_SEQ + 2] = _u32(v.seq)
            block[R_ACK:R_ACK + 2] = self._ack_regs.get(cam, [0, 0])
            block[R_SCORE] = _scaled(v.score, 1000)
            block[R_THRESHOLD] = _scaled(v.threshold, 1000)
            block[R_FRAME_ID:R_FRAME_ID + 2] = _u32(v.frame_id if v.frame_id >= 0 else 0xFFFFFFFF)
            block[R_LATENCY] = _scaled(v.latency_ms, 10)
            block[R_PASS_COUNT:R_PASS_COUNT + 2] = _u32(v.pass_count)
            block[R_FAIL_COUNT:R_FAIL_COUNT + 2] = _u32(v.fail_count)
            block[R_ERROR_COUNT:R_ERROR_COUNT + 2] = _u32(v.error_count)
            block[R_WATCHDOG] = self.state.heartbeats & _U16
            block[R_BACKLOG] = min(v.backlog, _U16)
            block[R_OVERFLOWS] = v.overflows & _U16
            block[R_STATUS] = _status(v, self._waiting(v))
            block[R_HB_AGE] = min(int(age_ms), _U16)
            name = cam.encode("ascii", "replace")[:2 * NAME_REGISTERS].ljust(2 * NAME_REGISTERS, b"\0")
            block[NAME_OFFSET:NAME_OFFSET + NAME_REGISTERS] = [(name[i] << 8) | name[i + 1]
                                                               for i in range(0, len(name), 2)]
            out[base:base + BLOCK_REGISTERS] = block
        return out

    def bits(self) -> list[bool]:
        out = [False] * (COILS_PER_SLOT * self.slots)
        for k, cam in enumerate(self.slot_cameras()):
            v = self.state.view(self.protocol, cam)
            base = COILS_PER_SLOT * k
            out[base:base + 5] = [v.passed, v.failed, v.healthy, v.overflowed, self._waiting(v)]
        return out

    def _waiting(self, v) -> bool:
        return v.seq != 0 and v.verdict != "" and self.state.mode == "handshake" and v.seq != v.ack

    # -- pymodbus hook ------------------------------------------------------------------------------
    async def _action(self, function_code, start_address, address, count, current_registers, set_values):
        from pymodbus.constants import ExcCodes

        if set_values is not None:
            if WRITE_CODES.get(function_code) != "h":
                return ExcCodes.ILLEGAL_ADDRESS
            n = len(set_values) if function_code != 6 else 1
            slot, first = divmod(address, BLOCK_REGISTERS)
            if first not in ACK_OFFSETS or first + n - 1 not in ACK_OFFSETS:
                return ExcCodes.ILLEGAL_ADDRESS
            cams = self.slot_cameras()
            if slot >= len(cams):
                return ExcCodes.ILLEGAL_ADDRESS
            cam = cams[slot]
            regs = self._ack_regs.setdefault(cam, [0, 0])
            for i, value in enumerate(set_values[:n]):
                regs[first - R_ACK + i] = int(value) & _U16
            self.state.ack(self.protocol, cam, (regs[0] << 16) | regs[1])
            return None
        kind = READ_CODES.get(function_code)
        if kind in ("c", "d"):
            _fill_bits(current_registers, self.bits())
        elif kind in ("h", "i"):
            current_registers[:] = self.registers()[:len(current_registers)]
        return None


def _fill_bits(registers: list, values: list[bool]) -> None:
    from pymodbus.simulator.simutils import SimUtils

    packed = SimUtils.bitsToRegisters(values + [False] * (-len(values) % 16))
    registers[:len(packed)] = packed


def _u32(x: int) -> list[int]:
    x = int(x) & 0xFFFFFFFF
    return [x >> 16, x & _U16]


def _scaled(x: float, factor: float) -> int:
    if not isinstance(x, float) or math.isnan(x) or x < 0:
        return _U16
    return min(int(round(x * factor)), _U16)


def _status(v, waiting: bool) -> int:
    flags = (v.healthy, v.passed, v.failed, v.overflowed, v.gap, v.stale, v.starting, waiting)
    return sum(1 << i for i, f in enumerate(flags) if f)
