"""``cn2mirror capture``: the analyzer's end of jmirror.

Receives jmirror datagrams on a UDP port, or reads them from a pcap/pcapng file
(``--read``), strips the outer headers and writes the mirrored packets to a pcapng file
(``--write``) with one interface per (mirror id, session id) pair, named
``mid=<mid> sid=<sid>``, link type raw IP (101): jmirror carries the packet from its IP
header on. ``--format pcap`` writes everything to one raw-IP pcap instead, without the
per-pair interfaces. Timestamps are the kernel's receive time, or the input file's.
The decoding, counting, pcap reading and writing live in agent/pcap.py; this module is
the command line and the output.

Datagrams that are not jmirror are counted by reason (agent/jmirror.py REASONS), never
fatal. The capture stops on SIGINT/SIGTERM, after ``--count`` packets, after
``--timeout`` seconds or at the end of the ``--read`` file; the output is complete then.

JSON summary (``-o json``), printed once at the end; all keys are always present::

    {
      "source": {"kind": "udp", "address": "0.0.0.0", "port": 30030}
             or {"kind": "file", "path": "in.pcap", "port": 30030},
      "output": {"path": "out.pcapng", "format": "pcapng"} or null,
      "stopped_by": "count" | "timeout" | "signal" | "end_of_file",
      "elapsed_s": 1.5,          # wall-clock time the capture ran
      "packets": 3,              # mirrored packets kept (after --mirror-id/--session-id)
      "bytes": 252,              # their lengths, inner IP header on
      "sessions": [              # one per (mirror id, session id), sorted by the ids
        {"mirror_id": 1, "session_id": 2,
         "mirror_name": "csp demo/web rule 0" or null,   # from --names
         "session_name": "demo/web/eth0" or null,
         "interface": "mid=1 sid=2",                      # pcapng interface name
         "packets": 3, "bytes": 252,
         "first_seen": 1700000000.123456,                 # Unix time, seconds
         "last_seen": 1700000001.5}
      ],
      "filtered": 0,             # jmirror packets left out by --mirror-id/--session-id
      "dropped": 0,              # listening: datagrams the kernel dropped because the
                                 #   socket buffer was full (we read too slowly)
      "not_jmirror": {"too_short": 0, "bad_version": 0, "not_ip": 0},
      "other_frames": 0,         # --read: frames that are not UDP to the port
      "fragments": 0             # --read: first IP fragments of datagrams to the port;
                                 #   not reassembled, so not counted anywhere else
    }

The names file (``--names``, JSON or YAML) maps ids to names:
``{"mirror": {"123": "csp demo/web rule 0"}, "session": {"456": "demo/web/eth0"}}``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from datetime import datetime

import click
import yaml

from cn2mirror.agent.pcap import (
    Capture,
    CaptureError,
    FileSource,
    PcapngWriter,
    PcapWriter,
    Stopper,
    TruncatedFile,
    listen,
    load_names,
    open_socket,
    read_file,
)
from cn2mirror.agent.state import DEFAULT_JMIRROR_PORT, MIRROR_ID_MAX, SESSION_ID_MAX

# ---------------------------------------------------------------------------- output


def _local_time(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def format_table(capture: Capture, source: FileSource | None = None) -> str:
    sessions = capture.sorted_sessions()
    named = any(s.mirror_name or s.session_name for s in sessions)
    header = ["MID", "SID"] + (["MIRROR", "SESSION"] if named else []) + [
        "PACKETS", "BYTES", "LAST SEEN"]
    rows = [header]
    for s in sessions:
        names = [s.mirror_name or "-", s.session_name or "-"] if named else []
        rows.append([str(s.mirror_id), str(s.session_id), *names, str(s.packets), str(s.bytes),
                     _local_time(s.last_seen_ns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {"MIRROR", "SESSION", "LAST SEEN"}
    lines = ["  ".join(cell.ljust(w) if name in left else cell.rjust(w)
                       for cell, w, name in zip(row, widths, header, strict=True)).rstrip()
             for row in rows]
    bad = " ".join(f"{k}={v}" for k, v in capture.not_jmirror.items())
    lines.append(f"{capture.packets} packets, {capture.bytes} bytes in {len(sessions)} sessions;"
                 f" filtered {capture.filtered}; dropped {capture.dropped}; not jmirror: {bad}")
    if source is not None:
        lines.append(f"other frames {source.other_frames}; IP fragments (not reassembled)"
                     f" {source.fragments}")
    return "\n".join(lines)


def summary(capture: Capture, source: dict, output: dict | None, stopped_by: str,
            elapsed_s: float, file_source: FileSource | None = None) -> dict:
    return {
        "source": source,
        "output": output,
        "stopped_by": stopped_by,
        "elapsed_s": round(elapsed_s, 3),
        "packets": capture.packets,
        "bytes": capture.bytes,
        "sessions": [s.as_dict() for s in capture.sorted_sessions()],
        "filtered": capture.filtered,
        "dropped": capture.dropped,
        "not_jmirror": dict(capture.not_jmirror),
        "other_frames": file_source.other_frames if file_source else 0,
        "fragments": file_source.fragments if file_source else 0,
    }


# ---------------------------------------------------------------------------- command


@click.command("capture")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_JMIRROR_PORT,
              show_default=True, help="UDP port jmirror arrives on (0: any free port).")
@click.option("--bind", metavar="ADDR", help="Address to listen on [default: 0.0.0.0, :: with"
              " --ipv6]. An IPv6 address implies --ipv6.")
@click.option("--ipv6", is_flag=True, help="Listen on IPv6 (:: also takes IPv4 senders).")
@click.option("-r", "--read", "read_path", metavar="FILE",
              help="Read jmirror from a pcap/pcapng file instead of listening.")
@click.option("-w", "--write", "write_path", metavar="FILE",
              help="Write the mirrored packets here ('-': stdout, e.g. into wireshark -k -i -).")
@click.option("--format", "file_format", type=click.Choice(["pcapng", "pcap"]),
              default="pcapng", show_default=True, help="pcap: one file, no per-pair interfaces.")
@click.option("--names", "names_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON/YAML file naming ids: {mirror: {id: name}, session: {id: name}}.")
@click.option("--mirror-id", "mirror_ids", multiple=True, type=click.IntRange(0, MIRROR_ID_MAX),
              help="Keep only this mirror id (repeatable).")
@click.option("--session-id", "session_ids", multiple=True,
              type=click.IntRange(0, SESSION_ID_MAX),
              help="Keep only this session id (repeatable).")
@click.option("-c", "--count", type=click.IntRange(min=1), help="Stop after N mirrored packets.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after this long (listening only).")
@click.option("--interval", type=click.FloatRange(min=0), default=5.0, show_default=True,
              metavar="SECONDS",
              help="Print the live table to stderr this often (0: never; listening only).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Format of the final summary.")
def capture(port, bind, ipv6, read_path, write_path, file_format, names_path, mirror_ids,
            session_ids, count, timeout, interval, output):
    """Receive jmirror copies and write the mirrored packets to a pcapng file."""
    if read_path and (bind or ipv6):
        raise click.UsageError("--bind/--ipv6 are for listening; --read takes no address")
    if read_path and port == 0:
        raise click.UsageError("--port 0 is for listening; give the port to look for in --read")
    if write_path == "-" and sys.stdout.isatty():
        raise click.UsageError("refusing to write a capture file to a terminal")
    try:
        names = load_names(names_path) if names_path else None
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise click.BadParameter(str(e), param_hint="--names") from None

    try:
        with contextlib.ExitStack() as stack:  # closes everything, flushing the output first
            stopper = Stopper()
            stack.callback(stopper.close)
            # Signals only end the loop, so the files are finished in every case. Installed
            # first, so that a signal right after "listening" cannot kill us half-way.
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    stack.callback(signal.signal, sig, signal.signal(sig, stopper.stop))
            if read_path:
                file_source, sock = _open_file(stack, read_path, port, stopper), None
                source = {"kind": "file", "path": read_path, "port": port}
            else:
                file_source = None
                sock = stack.enter_context(open_socket(bind or ("::" if ipv6 else "0.0.0.0"),
                                                       port, ipv6))
                address, port = sock.getsockname()[:2]
                source = {"kind": "udp", "address": address, "port": port}
                where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                click.echo(f"listening for jmirror on UDP {where}", err=True)
            writer = _open_writer(stack, write_path, file_format) if write_path else None
            cap = Capture(writer, names, mirror_ids, session_ids, count)

            def tick():
                click.echo(format_table(cap) + "\n", err=True)
                if writer:
                    writer.flush()

            started = time.monotonic()
            if file_source is None:
                stopped_by = listen(cap, sock, stopper, timeout, interval, tick)
            else:
                try:
                    stopped_by = read_file(cap, file_source)
                except TruncatedFile:
                    click.echo(f"warning: {read_path} ends inside a record; read up to there",
                               err=True)
                    stopped_by = "end_of_file"
            elapsed = time.monotonic() - started
    except CaptureError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # receiving, or writing the output (disk full, closed pipe)
        raise click.ClickException(f"capture failed: {e}") from None

    output_info = {"path": write_path, "format": file_format} if write_path else None
    if output == "json":
        text = json.dumps(summary(cap, source, output_info, stopped_by, elapsed, file_source),
                          indent=2)
    else:
        text = format_table(cap, file_source)
    # With the capture file on stdout, everything for people goes to stderr.
    click.echo(text, err=write_path == "-")


def _open_file(stack: contextlib.ExitStack, path: str, port: int, stopper: Stopper) -> FileSource:
    try:
        return FileSource(stack.enter_context(open(path, "rb")), port, stopper)
    except OSError as e:
        raise CaptureError(f"cannot read {path}: {e.strerror}") from None
    except CaptureError as e:
        raise CaptureError(f"cannot read {path}: {e}") from None


def _open_writer(stack: contextlib.ExitStack, path: str, file_format: str):
    try:
        out = sys.stdout.buffer if path == "-" else stack.enter_context(open(path, "wb"))
    except OSError as e:
        raise CaptureError(f"cannot write {path}: {e.strerror}") from None
    stack.callback(out.flush)  # before the close registered above
    writer_class = PcapngWriter if file_format == "pcapng" else PcapWriter
    return writer_class(out, flush_each=path == "-")  # a pipe's reader wants every packet


if __name__ == "__main__":
    capture(prog_name="cn2mirror capture")
