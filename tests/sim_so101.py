"""Simulated SO-101 hardware for offline tests of LeRobot's real robot and motor-bus classes.

Three pieces, each replacing only what sits below LeRobot's own code:

* **Servos behind a serial port.** `FeetechMotorsBus` talks to its motors through `scservo_sdk`
  (`PortHandler` / `PacketHandler` / `GroupSyncRead` / `GroupSyncWrite`); `PortHandler` opens the port with
  `serial.Serial(...)` and moves bytes with `read` / `write`. `SimSerial` takes the place of that
  `serial.Serial` only: it parses the Feetech (SCS protocol 0) instruction packets the real SDK writes and
  answers with status packets like a chain of STS3215 servos, each with its own register memory laid out
  as LeRobot's control table (`lerobot/motors/feetech/tables.py`). Ping, broadcast ping, read, write,
  reg-write/action, sync read and sync write all go through the unmodified SDK and bus code.
  Every Goal_Position that reaches a servo is logged (`SimBus.goal_writes`).
* **Calibration files** (`write_calibration_file`), in the JSON layout `Robot._load_calibration` reads, with
  the same values preloaded into the simulated servos' EPROM, so `connect()` finds the arm calibrated and
  never prompts.
* **A camera** registered as `--robot.*.cameras='{name: {type: sim, ...}}'` through LeRobot's
  `CameraConfig.register_subclass`; `make_cameras_from_configs` builds it like any third-party camera.

Use `simulated_serial(monkeypatch, {port: SimBus(...)})` to install the servos for one test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lerobot.cameras import CameraConfig
from lerobot.cameras.camera import Camera
from lerobot.motors import MotorCalibration
from lerobot.motors.feetech.tables import (
    MODEL_CONTROL_TABLE,
    MODEL_NUMBER_TABLE,
    MODEL_RESOLUTION,
    STS_SMS_SERIES_BAUDRATE_TABLE,
)

# ----------------------------------------------------------------------------------------------------------
# Feetech protocol 0 (little-endian SCS protocol), as the STS3215 speaks it
# ----------------------------------------------------------------------------------------------------------
BROADCAST_ID = 0xFE
INST_PING, INST_READ, INST_WRITE, INST_REG_WRITE, INST_ACTION = 1, 2, 3, 4, 5
INST_SYNC_READ, INST_SYNC_WRITE = 0x82, 0x83

STS3215 = "sts3215"
CONTROL_TABLE: dict[str, tuple[int, int]] = MODEL_CONTROL_TABLE[STS3215]
RESOLUTION: int = MODEL_RESOLUTION[STS3215]  # 4096 steps per turn
MEMORY_SIZE = 256

# Registers whose highest bit is a sign bit on the STS series (sign-magnitude encoding).
SIGN_BITS = {"Homing_Offset": 11, "Goal_Position": 15, "Present_Position": 15}
# The servo ignores host writes to its identity and status registers.
READ_ONLY = ("Firmware_Major_Version", "Firmware_Minor_Version", "Model_Number", "Present_Position",
             "Present_Velocity", "Present_Load", "Present_Voltage", "Present_Temperature", "Status", "Moving",
             "Present_Current")
BAUD_OF_CODE = {code: baud for baud, code in STS_SMS_SERIES_BAUDRATE_TABLE.items()}

SO101_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


def _checksum(body: bytes | list[int]) -> int:
    return ~sum(body) & 0xFF


def _to_sign_magnitude(value: int, sign_bit: int) -> int:
    magnitude = abs(int(value))
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit a sign-magnitude register with the sign at bit {sign_bit}")
    return ((1 << sign_bit) | magnitude) if value < 0 else magnitude


def _from_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw >> sign_bit & 1 else magnitude


@dataclass(frozen=True)
class GoalWrite:
    """One Goal_Position a servo accepted: where, which servo, the register word and its signed value."""

    seq: int
    port: str
    motor_id: int
    raw: int  # the 16-bit register content as sent
    position: int  # raw decoded (sign-magnitude, bit 15): the step the servo is told to reach
    instruction: str  # "write", "sync_write" or "action"


class SimServo:
    """One STS3215: a register memory plus the little behaviour the tests rely on.

    With torque enabled, Present_Position jumps to Goal_Position (clipped to the position limits when they
    form a range, as the servo firmware does). Enabling torque makes the servo hold where it is.
    """

    def __init__(self, motor_id: int, position: int = RESOLUTION // 2, firmware: tuple[int, int] = (3, 10),
                 model: str = STS3215, calibration: MotorCalibration | None = None) -> None:
        self.memory = bytearray(MEMORY_SIZE)
        self._set("Firmware_Major_Version", firmware[0])
        self._set("Firmware_Minor_Version", firmware[1])
        self._set("Model_Number", MODEL_NUMBER_TABLE[model])
        self._set("ID", motor_id)
        self._set("Baud_Rate", STS_SMS_SERIES_BAUDRATE_TABLE[1_000_000])
        self._set("Return_Delay_Time", 250)  # factory default (500 us)
        self._set("Response_Status_Level", 1)
        self._set("Min_Position_Limit", 0)
        self._set("Max_Position_Limit", RESOLUTION - 1)
        self._set("P_Coefficient", 32)
        self._set("D_Coefficient", 32)
        self._set("Max_Torque_Limit", 1000)
        self._set("Lock", 1)
        if calibration is not None:  # EPROM of an arm that was calibrated before
            self.set("Homing_Offset", calibration.homing_offset)
            self._set("Min_Position_Limit", calibration.range_min)
            self._set("Max_Position_Limit", calibration.range_max)
        self.set("Present_Position", position)
        self.set("Goal_Position", position)
        self._pending: tuple[int, bytes] | None = None  # REG_WRITE buffer

    # register access ---------------------------------------------------------------------------------
    def _raw(self, name: str) -> int:
        addr, size = CONTROL_TABLE[name]
        return int.from_bytes(self.memory[addr : addr + size], "little")

    def _set(self, name: str, raw: int) -> None:
        addr, size = CONTROL_TABLE[name]
        self.memory[addr : addr + size] = int(raw).to_bytes(size, "little")

    def get(self, name: str) -> int:
        """Register value, sign decoded where the STS series uses a sign bit."""
        raw = self._raw(name)
        return _from_sign_magnitude(raw, SIGN_BITS[name]) if name in SIGN_BITS else raw

    def set(self, name: str, value: int) -> None:
        """Set a register from the servo's side (no write is logged)."""
        self._set(name, _to_sign_magnitude(value, SIGN_BITS[name]) if name in SIGN_BITS else value)

    @property
    def id(self) -> int:
        return self._raw("ID")

    @property
    def baudrate(self) -> int:
        return BAUD_OF_CODE.get(self._raw("Baud_Rate"), -1)

    @property
    def torque_enabled(self) -> bool:
        return self._raw("Torque_Enable") == 1

    # protocol-level operations ------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.memory[addr : addr + length]) + bytes(max(0, addr + length - MEMORY_SIZE))

    def write(self, addr: int, data: bytes) -> bool:
        """Apply a host write; returns True when it reached Goal_Position."""
        torque_before = self.torque_enabled
        touched: set[str] = set()
        for offset, byte in enumerate(data):
            where = addr + offset
            name = next((n for n, (a, s) in CONTROL_TABLE.items() if a <= where < a + s), None)
            if name in READ_ONLY or where >= MEMORY_SIZE:
                continue
            self.memory[where] = byte
            if name is not None:
                touched.add(name)
        if self.torque_enabled and not torque_before and "Goal_Position" not in touched:
            self.set("Goal_Position", self.get("Present_Position"))  # hold the current pose
        if self.torque_enabled:
            self._track_goal()
        return "Goal_Position" in touched

    def _track_goal(self) -> None:
        goal = self.get("Goal_Position")
        low, high = self._raw("Min_Position_Limit"), self._raw("Max_Position_Limit")
        if low < high:
            goal = min(max(goal, low), high)
        self.set("Present_Position", goal)


class SimBus:
    """The servos daisy-chained on one serial port, and a log of the Goal_Position writes they accepted."""

    def __init__(self, servos: list[SimServo]) -> None:
        self.servos = servos
        self.goal_writes: list[GoalWrite] = []
        self.instructions: list[tuple[str, int]] = []  # (instruction, id) in arrival order
        self.port = "?"
        self._seq: list[int] | None = None  # shared counter when several buses are simulated together

    @classmethod
    def so101_arm(cls, calibration: Mapping[str, MotorCalibration], start: Mapping[str, int] | None = None) -> SimBus:
        """Six STS3215 with ids 1..6, EPROM holding `calibration`, resting at `start` (raw steps; default:
        40% into each calibrated range)."""
        servos = []
        for name in SO101_MOTORS:
            cal = calibration[name]
            position = (start or {}).get(name, cal.range_min + (cal.range_max - cal.range_min) * 2 // 5)
            servos.append(SimServo(cal.id, position=position, calibration=cal))
        return cls(servos)

    def servo(self, motor_id: int) -> SimServo:
        return next(s for s in self.servos if s.id == motor_id)

    def _log_goal(self, servo: SimServo, instruction: str) -> None:
        counter = self._seq if self._seq is not None else [len(self.goal_writes)]
        counter[0] += 1
        raw, position = servo._raw("Goal_Position"), servo.get("Goal_Position")
        self.goal_writes.append(GoalWrite(counter[0], self.port, servo.id, raw, position, instruction))

    def handle(self, packet: bytes, baudrate: int) -> bytes:
        """Answer one well-formed instruction packet; returns the status bytes sent back (maybe none)."""
        target, instruction, params = packet[2], packet[4], packet[5:-1]
        listening = [s for s in self.servos if s.baudrate == baudrate]
        self.instructions.append((_INSTRUCTION_NAMES.get(instruction, hex(instruction)), target))

        def status(servo: SimServo, data: bytes = b"") -> bytes:
            body = bytes([servo.id, len(data) + 2, 0]) + data
            return b"\xff\xff" + body + bytes([_checksum(body)])

        def addressed() -> list[SimServo]:
            return [s for s in listening if target in (s.id, BROADCAST_ID)]

        if instruction == INST_PING:
            return b"".join(status(s) for s in sorted(addressed(), key=lambda s: s.id))
        if instruction == INST_READ:
            addr, length = params[0], params[1]
            return b"".join(status(s, s.read(addr, length)) for s in addressed() if target != BROADCAST_ID)
        if instruction in (INST_WRITE, INST_REG_WRITE):
            addr, data = params[0], bytes(params[1:])
            reply = b""
            for servo in addressed():
                if instruction == INST_WRITE:
                    if servo.write(addr, data):
                        self._log_goal(servo, "write")
                else:
                    servo._pending = (addr, data)
                if target != BROADCAST_ID and servo._raw("Response_Status_Level"):
                    reply += status(servo)
            return reply
        if instruction == INST_ACTION:
            for servo in addressed():
                if servo._pending is not None:
                    addr, data = servo._pending
                    servo._pending = None
                    if servo.write(addr, data):
                        self._log_goal(servo, "action")
            return b""
        if instruction == INST_SYNC_WRITE:
            addr, length, rest = params[0], params[1], bytes(params[2:])
            for i in range(0, len(rest) - length, length + 1):
                motor_id, data = rest[i], rest[i + 1 : i + 1 + length]
                for servo in (s for s in listening if s.id == motor_id):
                    if servo.write(addr, data):
                        self._log_goal(servo, "sync_write")
            return b""
        if instruction == INST_SYNC_READ:
            addr, length, ids = params[0], params[1], list(params[2:])
            by_id = {s.id: s for s in listening}
            return b"".join(status(by_id[i], by_id[i].read(addr, length)) for i in ids if i in by_id)
        return b""


_INSTRUCTION_NAMES = {INST_PING: "ping", INST_READ: "read", INST_WRITE: "write", INST_REG_WRITE: "reg_write",
                      INST_ACTION: "action", INST_SYNC_READ: "sync_read", INST_SYNC_WRITE: "sync_write"}


class SimSerial:
    """Stands in for `serial.Serial` inside `scservo_sdk.port_handler`: bytes written are instruction
    packets for the simulated servos on that port, bytes read are their status packets."""

    buses: dict[str, SimBus] = {}

    def __init__(self, port: str | None = None, baudrate: int = 9600, timeout: float | None = None, **_: Any) -> None:
        import serial

        if port not in self.buses:
            raise serial.SerialException(f"[Errno 2] could not open port {port}: No such file or directory")
        self.port, self.baudrate, self.timeout = port, baudrate, timeout
        self.bus = self.buses[port]
        self.is_open = True
        self._rx = bytearray()
        self._tx = bytearray()

    def _check_open(self) -> None:
        if not self.is_open:
            import serial

            raise serial.PortNotOpenError()

    @property
    def in_waiting(self) -> int:
        self._check_open()
        return len(self._rx)

    def reset_input_buffer(self) -> None:
        self._check_open()
        self._rx.clear()

    def reset_output_buffer(self) -> None:
        self._tx.clear()

    def flush(self) -> None:
        self._check_open()

    def close(self) -> None:
        self.is_open = False

    def read(self, size: int = 1) -> bytes:
        self._check_open()
        data = bytes(self._rx[:size])
        del self._rx[:size]
        return data

    def write(self, data) -> int:
        self._check_open()
        data = bytes(data)
        self._tx += data
        self._process()
        return len(data)

    def _process(self) -> None:
        # Servos parse the line byte by byte: skip to a header, wait for a whole packet, drop bad checksums.
        while True:
            start = self._tx.find(b"\xff\xff")
            if start < 0:
                self._tx = self._tx[-1:] if self._tx[-1:] == b"\xff" else bytearray()
                return
            del self._tx[:start]
            if len(self._tx) < 4:
                return
            total = self._tx[3] + 4
            if len(self._tx) < total:
                return
            packet = bytes(self._tx[:total])
            del self._tx[:total]
            if packet[-1] != _checksum(packet[2:-1]):
                continue
            self._rx += self.bus.handle(packet, self.baudrate)


def simulated_serial(monkeypatch, buses: Mapping[str, SimBus]) -> dict[str, SimBus]:
    """Route every serial port that `scservo_sdk` opens to the simulated `buses` (port name -> SimBus) for the
    rest of the test; any other port fails to open like a missing device. The Goal_Position writes of all
    the buses share one sequence counter, so their order across ports is known."""
    import scservo_sdk.port_handler as port_handler

    class _SerialModule:  # all `scservo_sdk.port_handler` uses of pyserial: `serial.Serial`, `serial.EIGHTBITS`
        Serial = SimSerial
        EIGHTBITS = 8

    counter = [0]
    for port, bus in buses.items():
        bus.port, bus._seq = port, counter
    monkeypatch.setattr(port_handler, "serial", _SerialModule)
    monkeypatch.setattr(SimSerial, "buses", dict(buses))
    return SimSerial.buses


def all_goal_writes(buses: Mapping[str, SimBus]) -> list[GoalWrite]:
    return sorted((w for bus in buses.values() for w in bus.goal_writes), key=lambda w: w.seq)


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------
def so101_calibration(variant: int = 0) -> dict[str, MotorCalibration]:
    """A plausible, distinct calibration per arm: every motor has its own range and homing offset."""
    base = {  # (homing_offset, range_min, range_max) in raw steps
        "shoulder_pan": (12, 760, 3300),
        "shoulder_lift": (-35, 880, 3150),
        "elbow_flex": (140, 960, 3080),
        "wrist_flex": (-60, 1100, 2990),
        "wrist_roll": (-7, 120, 3980),
        "gripper": (205, 2010, 3420),
    }
    calibration = {}
    for motor_id, (name, (offset, low, high)) in enumerate(base.items(), start=1):
        shift = variant * (23 + 11 * motor_id)
        calibration[name] = MotorCalibration(id=motor_id, drive_mode=0, homing_offset=offset - variant * 9,
                                             range_min=low + shift, range_max=high - shift // 2)
    return calibration


def write_calibration_file(directory: str | Path, robot_id: str, calibration: Mapping[str, MotorCalibration]) -> Path:
    """`<directory>/<robot_id>.json` in the format `Robot._load_calibration` reads."""
    path = Path(directory) / f"{robot_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {name: {"id": c.id, "drive_mode": c.drive_mode, "homing_offset": c.homing_offset,
                      "range_min": c.range_min, "range_max": c.range_max} for name, c in calibration.items()}
    path.write_text(json.dumps(payload, indent=4))
    return path


def degrees(raw: float, cal: MotorCalibration) -> float:
    """Raw steps -> LeRobot's DEGREES units (`use_degrees=True` joints)."""
    return (raw - (cal.range_min + cal.range_max) / 2) * 360 / (RESOLUTION - 1)


def percent(raw: float, cal: MotorCalibration) -> float:
    """Raw steps -> LeRobot's RANGE_0_100 units (the gripper)."""
    return (raw - cal.range_min) / (cal.range_max - cal.range_min) * 100


# ----------------------------------------------------------------------------------------------------------
# Camera
# ----------------------------------------------------------------------------------------------------------
CAMERA_TYPE = "sim"


@dataclass(kw_only=True)
class SimCameraConfig(CameraConfig):
    """`type: sim`: synthetic frames, different every read."""

    seed: int = 0


if CAMERA_TYPE not in CameraConfig.get_known_choices():
    CameraConfig.register_subclass(CAMERA_TYPE)(SimCameraConfig)


class SimCamera(Camera):
    """Built by `make_cameras_from_configs` for `type: sim`, through LeRobot's third-party path
    (`make_device_from_device_class`: the class named like the config minus `Config`, looked up in the
    config's module, so this file must be imported as the top-level module `sim_so101`, which pytest does
    for `tests/` without an `__init__.py`). Frames are uint8 [height, width, 3]: a gradient that scrolls
    with the frame count, plus seeded noise, so no two reads are equal."""

    def __init__(self, config: SimCameraConfig) -> None:
        super().__init__(config)
        self.config = config
        self._connected = False
        self._count = 0
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(config.seed)
        self.frames_read = 0

    @property
    def is_connected(self) -> bool:
        return self._connected

    @staticmethod
    def find_cameras() -> list[dict[str, Any]]:
        return []

    def connect(self, warmup: bool = True) -> None:
        self._connected = True
        if warmup:
            self.read()

    def _frame(self) -> np.ndarray:
        height, width = self.config.height, self.config.width
        with self._lock:
            self._count += 1
            count = self._count
            noise = self._rng.integers(0, 32, (height, width, 3), dtype=np.uint8)
        rows, cols = np.mgrid[0:height, 0:width]
        frame = np.stack([(rows * 4 + count * 7) % 224, (cols * 4 + count * 3) % 224,
                          np.full((height, width), (count * 11) % 224)], axis=-1)
        return (frame + noise).astype(np.uint8)  # < 256: no wrap-around

    def read(self) -> np.ndarray:
        if not self._connected:
            raise RuntimeError(f"{self} is not connected")
        self.frames_read += 1
        return self._frame()

    def async_read(self, timeout_ms: float = 200) -> np.ndarray:
        return self.read()

    def read_latest(self, max_age_ms: int = 500) -> np.ndarray:
        return self.read()

    def disconnect(self) -> None:
        self._connected = False


__all__ = [
    "GoalWrite", "SimServo", "SimBus", "SimSerial", "simulated_serial", "all_goal_writes", "so101_calibration",
    "write_calibration_file", "degrees", "percent", "SimCameraConfig", "SimCamera", "SO101_MOTORS",
]

