"""Line-side commands: run, camera, plc-listen, keys, demo (registered on the main group by cli.py).

Each is a thin layer over a Python API a test can call directly (:mod:`memseg_edge.runtime`,
:mod:`memseg_edge.sources`, :mod:`memseg_edge.plc`, :mod:`memseg_edge.transport`,
:mod:`memseg_edge.demo`). Nothing here imports torch; ``demo`` imports the trainer when it runs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from .threads import threads_option

ENDPOINT_HELP = ("PORT means tcp://127.0.0.1:PORT (this machine only); HOST:PORT, tcp://HOST:PORT, ipc:///path "
                 "are used as written; all interfaces only when written: tcp://*:PORT or 0.0.0.0:PORT.")


def _log(message: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} {message}", err=True)


def _endpoint(value: str, *, bind: bool, option: str) -> str:
    from .transport import EndpointError, endpoint

    try:
        return endpoint(value, bind=bind)
    except EndpointError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _curve_client_options(f):
    """--curve-keys / --curve-client of a client of the runtime (camera station, PLC gateway)."""
    f = click.option("--curve-client", default=None,
                     help="Which NAME.key_secret in --curve-keys (when there are several).")(f)
    return click.option("--curve-keys", type=click.Path(exists=True, file_okay=False), default=None,
                        help="CurveZMQ: DIR holds the runtime's server.key and this client's NAME.key_secret "
                             "(made by `memseg-edge keys DIR --client NAME`).")(f)


def _client_keys(curve_keys: str | None, curve_client: str | None):
    if not curve_keys:
        return None
    from .transport import load_client_keys

    try:
        return load_client_keys(curve_keys, curve_client)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


class _Signals:
    """SIGINT/SIGTERM: the first asks for an orderly stop (flush, then exit), a second one exits at once."""

    def __init__(self, on_stop, what: str):
        self._on_stop = on_stop
        self._what = what
        self._count = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self._count += 1
        if self._count == 1:
            _log(f"{signal.Signals(signum).name}: {self._what} (press Ctrl-C again to quit at once)")
            self._on_stop()
        else:
            _log("second signal: quitting now, frames in flight are lost")
            os._exit(130)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _source_options(f):
    f = click.option("--images", "images", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
                     help="A folder of images (.png .jpg .jpeg .bmp .tif .tiff), read in name order.")(f)
    f = click.option("--video", "videos", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="A video file OpenCV can read.")(f)
    f = click.option("--camera", "cameras", multiple=True, type=click.IntRange(min=0), metavar="IDX",
                     help="A camera by OpenCV index (0 = the first); reopened with back-off when it drops out.")(f)
    return f


def _pylon_options(f):
    """Basler cameras through pypylon and their GenICam settings (run and camera)."""
    f = click.option("--camera-feature", "camera_features", multiple=True, metavar="NAME=VALUE",
                     help="Any other GenICam feature of a --pylon camera, set as written before grabbing starts "
                          "(repeatable), e.g. BinningHorizontal=2.")(f)
    f = click.option("--pixel-format", default=None, metavar="NAME",
                     help="GenICam PixelFormat of a --pylon camera (Mono8, BGR8, RGB8, BayerRG8, ...; default: "
                          "the camera's; Bayer and other formats are converted to BGR).")(f)
    f = click.option("--exposure-us", type=click.FloatRange(min=0, min_open=True), default=None, metavar="US",
                     help="Exposure time of a --pylon camera in microseconds (auto exposure off).")(f)
    f = click.option("--trigger", type=click.Choice(["off", "software", "line1", "line2", "line3", "line4"]),
                     default="off", show_default=True,
                     help="--pylon cameras: off = free-run at the camera's rate; software = one trigger per frame, "
                          "fired when the previous one was taken (nothing dropped); lineN = hardware trigger on "
                          "input line N (a light barrier or the PLC).")(f)
    f = click.option("--pylon", "pylon", multiple=True, metavar="SERIAL|INDEX[=NAME]",
                     help="A Basler camera through pypylon (pip install 'memseg-edge[pylon]'): serial number or "
                          "index (0 = the first), optionally =NAME for its camera name (default pylon-SERIAL). "
                          "Frame ids are the camera's own counter; a camera that drops out is reopened with "
                          "back-off.")(f)
    return f


def _camera_settings(trigger: str, exposure_us, pixel_format, camera_features, fps=None):
    from .cameras import CameraSettings

    features = {}
    for item in camera_features:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: write NAME=VALUE", param_hint="--camera-feature")
        features[key.strip()] = value
    return CameraSettings(trigger=trigger, exposure_us=exposure_us, pixel_format=pixel_format, fps=fps or None,
                          features=features)


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------

@click.command("run", context_settings={"max_content_width": 110})
@click.option("--model", type=click.Path(exists=True),
              help="Required. A bundle folder or one of its .onnx files (onnxruntime, CPU), or a .engine file built by "
                   "`memseg-edge build-engine` (TensorRT on the GPU; its .engine.json sidecar is checked first).")
@click.option("--zmq", "zmq_endpoints", multiple=True, metavar="ENDPOINT",
              help="Bind a frame endpoint (PULL) that camera stations connect to (repeatable). " + ENDPOINT_HELP)
@_source_options
@click.option("--results", metavar="ENDPOINT",
              help="Required. Bind the verdict endpoint (PUB): one [verdict.<camera>, JSON] per frame plus a "
                   "heartbeat.")
@_pylon_options
@click.option("--metrics", "metrics_port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (--metrics-host to change): frames, "
                   "verdicts by camera, errors by kind, drops, queue depth, batch sizes, latency per stage, model "
                   "(pip install 'memseg-edge[plant]').")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Interface of the --metrics endpoint (0.0.0.0: every interface).")
@click.option("--previews", default=None, metavar="ENDPOINT",
              help="Bind a preview endpoint (PUB) for `memseg-edge hmi`: JPEG overlays, at most --preview-fps per "
                   "camera per second plus as many rejects, encoded off the judging path. " + ENDPOINT_HELP)
@click.option("--preview-fps", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Previews per camera per second (and as many rejects besides).")
@click.option("--reply", default=None, metavar="ENDPOINT",
              help="Bind a request-reply endpoint (ROUTER; REQ or DEALER clients): send a frame [header, payload] "
                   "and get its verdict, or {\"trigger\": true, \"camera\": NAME} for that camera's next verdict.")
@click.option("--threshold", type=float, default=None,
              help="Decision threshold (score >= T is FAIL). Default: the one chosen at training (model.json).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Most frames judged together (default: the engine's largest batch; 8 with onnxruntime).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a batch waits for more frames after its first is ready (0 = never wait).")
@click.option("--queue", "queue_frames", type=click.IntRange(min=1), default=32, show_default=True, metavar="N",
              help="Frames waiting to be judged before the oldest is dropped (ERROR 'dropped: runtime overloaded').")
@click.option("--save-failures", type=click.Path(file_okay=False), default=None,
              help="Write an overlay (anomaly map over the frame) of every FAIL verdict here, DIR/<camera>/...jpg.")
@click.option("--save-passes", is_flag=True,
              help="With --save-failures: keep overlays of PASS frames too (named ..._pass.jpg), e.g. to review "
                   "what the line lets through while commissioning.")
@click.option("--save-budget-mb", type=click.FloatRange(min=1), default=500.0, show_default=True,
              help="Disk budget of --save-failures: the oldest overlays are deleted to stay under it.")
@click.option("--display", is_flag=True, help="Show the latest verdict in a window (needs OpenCV with a GUI).")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, metavar="N",
              help="Accept this many frames, judge them, then exit.")
@click.option("--stats-every", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Print counters and p50/p99 latency per stage every S seconds (0 = only at exit).")
@click.option("--stats-json", type=click.Path(dir_okay=False), default=None,
              help="Write the final counters and latencies here as JSON at exit.")
@click.option("--heartbeat", "heartbeat_s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between heartbeats on the verdict endpoint.")
@click.option("--camera-timeout", "camera_timeout_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="A --camera that delivers no frame within S seconds of starting stops the runtime with an error "
                   "(0 = keep retrying). Once it has delivered, drop-outs are retried forever.")
@click.option("--quiet", is_flag=True, help="Do not print a line per verdict on the console (stdout).")
@click.option("--trigger-timeout", "trigger_timeout_s", type=click.FloatRange(min=0.01), default=5.0,
              show_default=True, help="A trigger with no frame from its camera within S seconds is answered ERROR.")
@click.option("--curve-keys", type=click.Path(exists=True, file_okay=False), default=None,
              help="Encrypt and authenticate every endpoint with CurveZMQ: DIR holds server.key_secret and "
                   "authorized/*.key (make them with `memseg-edge keys DIR`).")
@threads_option
def run_cmd(model, zmq_endpoints, cameras, videos, images, results, reply, threshold, max_batch, max_wait_ms,
            queue_frames, save_failures, save_passes, save_budget_mb, display, max_frames, stats_every, stats_json, heartbeat_s,
            camera_timeout_s, quiet, trigger_timeout_s, curve_keys, threads, pylon, trigger, exposure_us, pixel_format,
            camera_features, metrics_port, metrics_host, previews, preview_fps):
    """Judge frames from camera stations and local sources; publish a verdict per frame.

    \b
    Examples:
      # camera stations on this machine push to port 5555; PLC gateways read verdicts on 5556
      memseg-edge run --model bundles/bottle --zmq 5555 --results 5556
      # stations on the plant network, encrypted; overlays of rejects kept within 2 GB
      memseg-edge run --model bottle.int8.engine --zmq tcp://*:5555 --results tcp://*:5556 \\
          --curve-keys keys/ --save-failures rejects/ --save-budget-mb 2000
      # judge an image folder once, print stats, exit
      memseg-edge run --model bundles/bottle --images test_images/ --results ipc:///tmp/verdicts
      # a Basler camera on a light barrier, Prometheus on 9100, previews for `memseg-edge hmi`
      memseg-edge run --model bundles/bottle --pylon 40012345=top --trigger line1 --results 5556 \\
          --metrics 9100 --previews 5557

    Verdicts (JSON): v, type, seq (gap-free, all cameras), camera, frame_id, verdict PASS|FAIL|ERROR,
    score, threshold, latency_ms, model, error. Bad input never stops the runtime: it is counted, logged
    once per kind, and answered with ERROR when it named a frame_id. SIGINT/SIGTERM: stop taking frames,
    judge and publish what is in flight, exit. One line per verdict on stdout (--quiet: none); logs on stderr.

    Exit code: 0 frames were judged; 1 refused to start, a pipeline stage failed, a camera never opened,
    or it stopped before any frame was judged; 2 options missing or wrong; 130 a second Ctrl-C.
    """
    from .runtime import ConfigError, Runtime, RuntimeConfig, load_model
    from .transport import all_interfaces

    missing = [name for name, value in (("--model MODEL", model), ("--results ENDPOINT", results)) if not value]
    if missing:
        if not (zmq_endpoints or cameras or videos or images or reply or pylon):
            missing.append("a frame source (no frame source: --zmq ENDPOINT, --camera IDX, --pylon SERIAL, --video FILE, "
                           "--images DIR or --reply ENDPOINT)")
        raise click.UsageError("missing " + ", ".join(missing))

    zmq_urls = [_endpoint(e, bind=True, option="--zmq") for e in zmq_endpoints]
    results_url = _endpoint(results, bind=True, option="--results")
    reply_url = _endpoint(reply, bind=True, option="--reply") if reply else None
    previews_url = _endpoint(previews, bind=True, option="--previews") if previews else None
    settings = _camera_settings(trigger, exposure_us, pixel_format, camera_features) if pylon else None
    for url in zmq_urls + [results_url] + [u for u in (reply_url, previews_url) if u]:
        if all_interfaces(url) and not curve_keys:
            _log(f"warning: {url} listens on every network interface without --curve-keys: anyone on the network "
                 "can send frames and read verdicts")
    display_window = None
    if display:
        from .overlay import Display

        try:
            display_window = Display()
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    config = RuntimeConfig(results=results_url, zmq=zmq_urls, reply=reply_url, cameras=list(cameras),
                           videos=list(videos), images=list(images), threshold=threshold, max_batch=max_batch,
                           max_wait_ms=max_wait_ms, queue_frames=queue_frames, save_failures=save_failures,
                           save_passes=save_passes, save_budget_mb=save_budget_mb, display=display, max_frames=max_frames,
                           stats_every=stats_every, heartbeat_s=heartbeat_s, trigger_timeout_s=trigger_timeout_s,
                           curve_keys=curve_keys, camera_timeout_s=camera_timeout_s, pylon=list(pylon),
                           camera_settings=settings, metrics_port=metrics_port, metrics_host=metrics_host,
                           previews=previews_url, preview_fps=preview_fps)
    printer = None if quiet else _VerdictPrinter()
    try:
        loaded = load_model(model, threads=threads, log=_log)
        runtime = Runtime(config, loaded, log=_log, on_verdict=printer.offer if printer else None)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    origin = " (from --threshold)" if threshold is not None else (f" ({loaded.threshold_rule})" if loaded.threshold_rule
                                                                   else "")
    _log(f"model {loaded.describe()}; threshold {runtime.threshold:.6g}{origin}; batch up to {runtime.max_batch}, "
         f"wait up to {max_wait_ms:g} ms; queue {queue_frames} frames")
    # the handlers go in before the sockets are bound, so a Ctrl-C just after "ready" is an orderly stop
    with _Signals(runtime.request_stop, "stopping: judging the frames in flight"):
        try:
            runtime.start()
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        ep = runtime.endpoints
        local = [f"camera {c}" for c in cameras] + [f"pylon {p}" for p in pylon] + [f"video {v}" for v in videos] + \
            [f"images {i}" for i in images]
        _log("ready: frames on " + (", ".join(ep["frames"] + local) or "-") + f"; verdicts on {ep['results']}"
             + (f"; requests on {ep['reply']}" if ep["reply"] else "")
             + (f"; previews on {ep['previews']}" if ep.get("previews") else "")
             + (f"; metrics on {ep['metrics']}" if ep.get("metrics") else "") + ("; CurveZMQ on" if curve_keys else ""))
        snapshot = runtime.run(on_tick=_display_tick(display_window, runtime) if display_window else None)
    if printer is not None:
        printer.close()
    if display_window is not None:
        display_window.close()
    if stats_json:
        Path(stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(stats_json).write_text(json.dumps(snapshot, indent=2))
    if runtime.failure is not None:     # already logged as an error when it happened
        sys.exit(1)
    if snapshot["judged"] == 0:
        _log(f"error: nothing was judged ({snapshot['received']} frames received, {snapshot['verdicts']} answered "
             "ERROR or dropped): exiting with code 1")
        sys.exit(1)


class _VerdictPrinter:
    """One line per verdict on stdout, written by its own thread behind a bounded queue, so a slow or
    blocked terminal never delays a verdict (lines it cannot keep up with are skipped and counted)."""

    def __init__(self, size: int = 1000):
        import queue

        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="memseg-console", daemon=True)
        self._thread.start()

    def offer(self, body: dict, label: str | None) -> None:
        import queue

        try:
            self._queue.put_nowait((body, label))
        except queue.Full:
            self.skipped += 1

    def _run(self) -> None:
        from .plc import format_verdict

        while True:
            item = self._queue.get()
            if item is None:
                return
            body, label = item
            try:
                click.echo(format_verdict(body) + (f"  {label}" if label else ""))
            except (OSError, ValueError):   # stdout closed: stop printing, keep judging
                return

    def close(self, timeout: float = 5.0) -> None:
        import queue

        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self.skipped:
            _log(f"{self.skipped} verdict lines were not printed (the console was too slow); the verdicts were "
                 "published")


def _display_tick(window, runtime):
    """The display's step, run by the main thread (HighGUI must be driven from one thread); False = quit."""
    from .overlay import make_overlay

    shown = [None]

    def tick() -> bool:
        latest = runtime.latest()
        if latest is None or latest is shown[0]:
            return window.poll()
        shown[0] = latest
        rgb, amap, verdict, score, camera, frame_id = latest
        return window.show(make_overlay(rgb, amap, verdict, score, runtime.threshold,
                                        caption=f"{camera} frame {frame_id}"))

    return tick


# ------------------------------------------------------------------------------------------------
# camera
# ------------------------------------------------------------------------------------------------

@click.command("camera", context_settings={"max_content_width": 110})
@_source_options
@_pylon_options
@click.option("--publish", required=True, metavar="ENDPOINT",
              help="The runtime's frame endpoint to connect to (PUSH). " + ENDPOINT_HELP)
@click.option("--fps", type=click.FloatRange(min=0), default=None,
              help="Frames per second (default: the camera's own rate; 10 for videos and image folders; "
                   "0 = as fast as possible, and the runtime drops what it cannot judge).")
@click.option("--encoding", type=click.Choice(["jpeg", "png", "bgr8", "rgb8", "mono8"]), default="jpeg",
              show_default=True, help="jpeg is small; png and the raw ones are lossless.")
@click.option("--name", default=None, help="Camera name in frames and verdict topics (default: from the source).")
@click.option("--loop", is_flag=True, help="Start a video or image folder again at its end.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many frames.")
@click.option("--linger", "linger_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="At exit, keep trying this many seconds to deliver frames still queued.")
@_curve_client_options
def camera_cmd(cameras, videos, images, publish, fps, encoding, name, loop, count, linger_s, curve_keys, curve_client,
               pylon, trigger, exposure_us, pixel_format, camera_features):
    """A camera station: capture frames and push them to a runtime (`memseg-edge run --zmq ...`).

    \b
    Examples:
      memseg-edge camera --camera 0 --publish line3-edge:5555 --name line3-top
      memseg-edge camera --images test_images/ --publish 5555 --encoding png --fps 5
      memseg-edge camera --video shift.mp4 --publish ipc:///tmp/frames --loop
      memseg-edge camera --pylon 40012345 --trigger software --exposure-us 800 --publish line3-edge:5555

    Frames are [header, payload] (docs/architecture.md "Frames in"); frame_id counts from 0, or is the camera's
    own frame counter for --pylon (a jump means the camera dropped frames). Frames queue until the runtime is
    reachable, and ZeroMQ reconnects by itself when the runtime restarts.
    """
    from .sources import open_capture, publish_frames

    given = [("camera", c) for c in cameras] + [("pylon", p) for p in pylon] + [("video", v) for v in videos] + \
        [("images", i) for i in images]
    if len(given) != 1:
        raise click.UsageError("give exactly one source: --camera IDX, --pylon SERIAL, --video FILE or --images DIR "
                               "(run one station per camera)")
    if name is not None:
        from .frames import CAMERA_RULE, valid_camera_name

        if not valid_camera_name(name):
            raise click.BadParameter(CAMERA_RULE, param_hint="--name")
    url = _endpoint(publish, bind=False, option="--publish")
    keys = _client_keys(curve_keys, curve_client)
    kind, spec = given[0]
    try:
        if kind == "pylon":
            from .cameras.pylon import PylonCamera, require_pypylon

            require_pypylon()
            device, _, spec_name = spec.partition("=")
            capture = PylonCamera(device, _camera_settings(trigger, exposure_us, pixel_format, camera_features, fps),
                                  name=name or spec_name or f"pylon-{device}",
                                  problem=lambda k, m: _log(f"warning: {m}"))
        else:
            capture = open_capture(kind, spec, name=name, loop=loop, problem=lambda k, m: _log(f"warning: {m}"))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    _log(f"camera {capture.name}: {kind} {spec} -> {url} ({encoding})")
    with _Signals(stop.set, "stopping after the current frame"):
        result = publish_frames(capture, url, encoding=encoding, fps=fps, count=count, curve=keys, linger_s=linger_s,
                                stop=stop, log=_log)
    _log(f"sent {result['sent']} frames in {result['seconds']:.1f} s"
         + (f", skipped {result['skipped']} (runtime unreachable or behind)" if result["skipped"] else "")
         + (f", {result['unreadable']} unreadable images" if result["unreadable"] else ""))


# ------------------------------------------------------------------------------------------------
# plc-listen
# ------------------------------------------------------------------------------------------------

@click.command("plc-listen", context_settings={"max_content_width": 110})
@click.argument("endpoint")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after this many verdicts.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Exit after S seconds (exit code 2 if --count verdicts had not arrived by then).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: verdict bodies and events.")
@click.option("--camera", "cameras", multiple=True, help="Only this camera's verdicts (repeatable; turns gap checks off).")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds without a heartbeat that count as heartbeat loss.")
@click.option("--stall-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="A heartbeat saying a frame has waited longer than S seconds for its verdict counts as a stalled "
                   "pipeline: silence, as a lost heartbeat is.")
@_curve_client_options
def plc_listen_cmd(endpoint, count, timeout, as_json, cameras, heartbeat_timeout, stall_timeout, curve_keys,
                   curve_client):
    """Subscribe to a runtime's verdicts (ENDPOINT: its --results), print them, and check the stream the way
    a PLC gateway must: sequence gaps, heartbeat loss, runtime restarts.

    \b
    Examples:
      memseg-edge plc-listen 5556
      memseg-edge plc-listen line3-edge:5556 --json --count 100 --timeout 60

    Exit code: 0 no gap, no heartbeat loss, no stall; 1 a gap, a heartbeat loss or a stalled pipeline was
    seen (a line controller must reject the parts concerned); 2 --timeout passed before --count verdicts
    arrived. With --camera, only verdicts whose camera is exactly one of those given are taken.
    """
    from .plc import VerdictListener, format_verdict

    url = _endpoint(endpoint, bind=False, option="ENDPOINT")
    keys = _client_keys(curve_keys, curve_client)
    stop = threading.Event()

    def on_verdict(body: dict) -> None:
        click.echo(json.dumps(body) if as_json else format_verdict(body))

    def on_event(kind: str, message: str, info: dict) -> None:
        if as_json:
            click.echo(json.dumps({"type": "event", "event": kind, "message": message, **info}))
        else:
            _log(message)

    if not as_json:
        _log(f"listening to {url}" + (f" (cameras {', '.join(cameras)})" if cameras else ""))
    with VerdictListener(url, cameras=tuple(cameras), heartbeat_timeout=heartbeat_timeout, stall_timeout=stall_timeout,
                         curve=keys) as listener, \
            _Signals(stop.set, "stopping"):
        report = listener.listen(count=count, timeout=timeout, stop=stop, on_verdict=on_verdict, on_event=on_event)
    if as_json:
        click.echo(json.dumps({"type": "summary", "verdicts": report.verdicts, "by_verdict": dict(report.by_verdict),
                               "gaps": report.gaps, "missing": report.missing, "heartbeats": report.heartbeats,
                               "heartbeat_losses": report.heartbeat_losses, "stalls": report.stalls,
                               "restarts": report.restarts,
                               "timed_out": report.timed_out}))
    else:
        _log(report.summary())
    if not report.ok:
        sys.exit(1)
    if report.timed_out and count is not None and report.verdicts < count:
        sys.exit(2)


# ------------------------------------------------------------------------------------------------
# keys, demo
# ------------------------------------------------------------------------------------------------

@click.command("keys", context_settings={"max_content_width": 110})
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True,
              help="A client that may send frames and read verdicts (repeatable; default 'station' when no "
                   "client of any kind is named).")
@click.option("--station", "stations", multiple=True,
              help="A camera station: may send frames (--zmq, --reply), may not read verdicts (repeatable).")
@click.option("--subscriber", "subscribers", multiple=True,
              help="A PLC gateway or other subscriber: may read verdicts, may not send frames (repeatable).")
def keys_cmd(folder, clients, stations, subscribers):
    """Make CurveZMQ keys for `run --curve-keys`, `camera --curve-keys` and `plc-listen --curve-keys`.

    \b
    Writes, in FOLDER:
      server.key, server.key_secret   the runtime's pair
      NAME.key, NAME.key_secret       one pair per client (--client, --station, --subscriber NAME)
      authorized/NAME.key             clients the runtime accepts on every endpoint
      stations/NAME.key               clients that may only send frames
      subscribers/NAME.key            clients that may only read verdicts
    Existing keys are kept. The runtime's machine keeps server.key_secret and authorized/ (it never
    leaves that machine); give each client server.key and its own NAME.key_secret, nothing else.
    Revoke a client by deleting its NAME.key from those folders and restarting the runtime.
    """
    from .transport import make_keys

    try:
        default = () if clients or stations or subscribers else ("station",)
        written = make_keys(folder, tuple(clients) or default, stations=tuple(stations), subscribers=tuple(subscribers))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--client") from None
    for path in written:
        click.echo(f"wrote {path}")
    if not written:
        click.echo(f"all keys already exist in {folder}")


@click.command("demo", context_settings={"max_content_width": 110})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for everything the demo writes (default: ./memseg-demo-YYYYmmdd-HHMMSS).")
@click.option("--backbone-weights", default=None, metavar="imagenet|FILE|none",
              help="MobileNetV2 encoder weights: imagenet (default; torchvision's cache, else a download; offline the "
                   "encoder is random and the demo says so), a local state_dict FILE, or none.")
@click.option("--iterations", type=click.IntRange(min=1), default=150, show_default=True,
              help="Training iterations.")
@threads_option
def demo_cmd(out_dir, backbone_weights, iterations, threads):
    """The whole line on this machine, no data or GPU needed: a synthetic product, a small model trained
    on it, and the runtime judging test frames sent by a camera station over ZeroMQ to a listening PLC
    gateway. About 45 s on 2 CPU cores (43 s idle, 45 s beside another job; 100 to 160 s when other jobs
    kept both cores busy); training is most of it, with a progress bar."""
    from .demo import run_demo

    if backbone_weights not in (None, "imagenet", "none") and not Path(backbone_weights).is_file():
        raise click.BadParameter(f"{backbone_weights} is not a file (nor imagenet or none)",
                                 param_hint="--backbone-weights")
    out = Path(out_dir) if out_dir else Path.cwd() / time.strftime("memseg-demo-%Y%m%d-%H%M%S")
    try:
        run_demo(out, backbone_weights=backbone_weights, iterations=iterations, threads=threads, log=click.echo)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def register(group: click.Group) -> None:
    """Add the runtime commands to ``group``."""
    for command in (run_cmd, camera_cmd, plc_listen_cmd, keys_cmd, demo_cmd):
        group.add_command(command)
