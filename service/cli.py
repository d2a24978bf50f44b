"""The `unfold` command line: serve, manage dictionaries, unfold files of activations.

Commands that talk to dictionaries run against a server when one is given (`--url` or
``UNFOLD_URL``, with `--api-key` or ``UNFOLD_API_KEY``), else in-process on the local data
directory (`--data-dir` or ``UNFOLD_DATA_DIR``, default ``./data``), the same one
`unfold serve` uses. `unfold run` in-process also takes a dictionary file or SAELens folder
in place of a dictionary name.

Exit codes: 0 success, 1 failure (one line on stderr: unknown dictionary, unreadable file,
server down, ...), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .schemas import PARAMS

METHODS = tuple(PARAMS)
DEFAULT_BATCH_SIZE = 1024  # rows per solve (and progress step) of `unfold run`
DEFAULT_SHARD_ROWS = 16384  # rows per output shard of `unfold run` (what a resume may redo)


class CLIError(Exception):
    """A failure worth one line on stderr and exit code 1."""


# serve


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import LOG_LEVELS

    from .app import create_app
    from .settings import Settings
    from .transport import CoalescingHttpToolsProtocol

    overrides = {
        key: value
        for key, value in {"host": args.host, "port": args.port, "data_dir": args.data_dir}.items()
        if value is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(
        f"Unfold serving on http://{settings.host}:{settings.port} "
        f"(data: {settings.data_dir.resolve()}, docs: /docs)",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=CoalescingHttpToolsProtocol,  # a response in one write, not two
        log_level=settings.log_level,
        # uvicorn formats every access line before the logger drops it: only when it is shown.
        access_log=LOG_LEVELS.get(settings.log_level.lower(), logging.INFO) <= logging.INFO,
    )
    return 0


# Where dictionaries live: a server, or the local data directory.


class Remote:
    """Dictionaries on a server, through `service.client.UnfoldClient` (`batch_size`: rows per
    unfold request; None: the client sizes them)."""

    def __init__(self, url: str, api_key: str | None, batch_size: int | None = None):
        from .client import UnfoldClient

        self.client = UnfoldClient(url, api_key, chunk_rows=batch_size)
        self.where = url

    def add(
        self, name: str, path: Path, tensor: str | None, bias_tensor: str | None, progress=None
    ) -> dict:
        """Upload only what the server keeps, streamed; `progress(sent, total)` in bytes."""
        return self.client.register_file(
            name, path, tensor=tensor, bias_tensor=bias_tensor, progress=progress
        )

    def list(self) -> list[dict]:
        return self.client.list()

    def show(self, ref: str) -> dict:
        return self.client.get(ref)

    def remove(self, ref: str) -> dict:
        info = self.client.get(ref)
        self.client.delete(ref)
        return info

    def solver(self, ref: str, method: str, params: dict):
        """(solve(rows) -> codes as tensors, description of the dictionary); the parameters
        are checked here against the dictionary's shape, before any row is sent."""
        from .unfolding import check_params

        info = self.client.get(ref)
        check_params(info["n_features"], info["d_model"], method, params)
        return (lambda rows: self.client.unfold(ref, rows, method, **params).tensors()), info

    def close(self) -> None:
        self.client.close()


class Local:
    """Dictionaries in a local data directory (the store `unfold serve` uses), no server.

    Do not point it at a data directory a running server uses: the server would not see
    changes until restarted, and opening the store clears its staging area.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.where = f"data directory {self.data_dir.resolve()}"
        self._store = None

    @property
    def store(self):
        from .store import DictionaryStore

        if self._store is None:
            self._store = DictionaryStore(self.data_dir)
        return self._store

    def add(
        self, name: str, path: Path, tensor: str | None, bias_tensor: str | None, progress=None
    ) -> dict:
        """Read and store the dictionary (nothing is uploaded: `progress` is not called)."""
        from .registry import Registry

        arrays = read_dictionary_file(path, tensor, bias_tensor)
        registry = Registry(self.store, gram_budget_bytes=0)  # no Gram: only registering
        registry.load_stored()  # so that names and contents are checked against the others
        entry, _ = registry.register(name, **arrays)
        return describe_record(entry.record)

    def records(self):
        if not (self.data_dir / "dictionaries").is_dir():  # nothing stored: create nothing
            return []
        return list(self.store.load_all())

    def list(self) -> list[dict]:
        return [describe_record(record) for record in self.records()]

    def find(self, ref: str):
        for record in self.records():
            if ref in (record.id, record.name):
                return record
        raise CLIError(f"no dictionary with id or name {ref!r} in {self.where}")

    def show(self, ref: str) -> dict:
        return describe_record(self.find(ref))

    def remove(self, ref: str) -> dict:
        record = self.find(ref)
        self.store.delete(record.id)
        return describe_record(record)

    def dictionary(self, ref: str):
        """(directions, bias, description) of a stored dictionary, or of a dictionary file or
        SAELens folder at path `ref`."""
        path = Path(ref)
        if path.exists():
            arrays = read_dictionary_file(path, None, None)
            directions, bias = arrays["directions"], arrays["bias"]
            info = {"name": path.name, "id": None}
        else:
            record = self.find(ref)
            directions, bias = record.directions, record.bias
            info = describe_record(record)
        info["n_features"], info["d_model"] = directions.shape
        return directions, bias, info

    def solver(self, ref: str, method: str, params: dict):
        """(solve(rows) -> codes as tensors, description of the dictionary)."""
        from .unfolding import RowSolver

        directions, bias, info = self.dictionary(ref)
        return RowSolver(directions, bias, method, params), info

    def close(self) -> None:
        pass


def describe_record(record) -> dict:
    return {
        "id": record.id,
        "name": record.name,
        "n_features": record.n_features,
        "d_model": record.d_model,
        "has_bias": record.bias is not None,
        "labels": len(record.labels or ()),
        "metadata": record.metadata,
        "created_at": record.created_at,
    }


def read_dictionary_file(path: Path, tensor: str | None, bias_tensor: str | None):
    """`Registry.register`'s directions, bias, metadata and encoder (of a SAELens folder that
    has one) from a .npy, a .safetensors or a SAELens folder: arrays memory-mapped in the
    file's dtype (the store converts them to float32)."""
    from .formats import SafetensorsFile, converted, dictionary_arrays, map_file, open_npy

    path, config = Path(path), None
    if path.is_dir():
        weights, config = path / "sae_weights.safetensors", path / "cfg.json"
        if not weights.is_file():
            raise CLIError(f"{path} is not a SAELens folder: no sae_weights.safetensors in it")
        path, config = weights, config.read_bytes() if config.is_file() else None
    elif path.suffix.lower() == ".npy":
        return converted(open_npy(path, str(path)), None, {})
    elif path.suffix.lower() != ".safetensors":
        raise CLIError(f"{path}: give a .npy or .safetensors file, or a SAELens folder")
    return dictionary_arrays(
        SafetensorsFile(map_file(path), str(path)), tensor, bias_tensor, config
    )


def backend(args: argparse.Namespace, batch_size: int | None = None):
    if args.url:
        return Remote(args.url, args.api_key, batch_size)
    return Local(args.data_dir)


# dict add | list | show | rm


UPLOAD_BAR_BYTES = 64 * 1024 * 1024


class UploadBar:
    """A `progress(sent, total)` callback drawing a tqdm bar of the bytes uploaded on stderr,
    only when stderr is a terminal or the upload is at least `UPLOAD_BAR_BYTES` (so that a log
    shows a long upload is moving; there it redraws at most every 5 s); never when `quiet`."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, sent: int, total: int) -> None:
        if self.bar is None:
            terminal = sys.stderr.isatty()
            if self.quiet or not (terminal or total >= UPLOAD_BAR_BYTES):
                return
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="upload",
                file=sys.stderr,
                mininterval=0.1 if terminal else 5.0,
            )
        self.bar.update(sent - self.bar.n)  # back to 0 when a retry sends the body again

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def dict_add(args: argparse.Namespace) -> int:
    with (
        contextlib.closing(backend(args)) as where,
        contextlib.closing(UploadBar(args.quiet)) as bar,
    ):
        info = where.add(args.name, Path(args.path), args.tensor, args.bias_tensor, bar)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(
            f"registered {info['name']} (id {info['id']}, {info['n_features']} features x "
            f"{info['d_model']} dimensions)"
        )
    return 0


def dict_list(args: argparse.Namespace) -> int:
    with contextlib.closing(backend(args)) as where:
        infos = where.list()
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    if not infos:
        print(f"no dictionaries in {where.where}", file=sys.stderr)
        return 0
    rows = [("NAME", "ID", "FEATURES", "D_MODEL", "BIAS")]
    rows += [
        (
            i["name"],
            i["id"],
            str(i["n_features"]),
            str(i["d_model"]),
            "yes" if i["has_bias"] else "no",
        )
        for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def dict_show(args: argparse.Namespace) -> int:
    with contextlib.closing(backend(args)) as where:
        print(json.dumps(where.show(args.ref), indent=2))
    return 0


def dict_rm(args: argparse.Namespace) -> int:
    with contextlib.closing(backend(args)) as where:
        info = where.remove(args.ref)
    print(f"deleted {info['name']} (id {info['id']})")
    return 0


# run


def solver_params(args: argparse.Namespace) -> dict:
    params = {"k": args.k, "tol": args.tol, "alpha": args.alpha, "max_iter": args.max_iter}
    params = {key: value for key, value in params.items() if value is not None}
    if args.positive:
        params["positive"] = True
    return params


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .datasets import Activations, CodesWriter, unfold_shards

    for name in ("batch_size", "shard_rows", "ray_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if args.ray and args.url:
        raise CLIError("--ray solves on the cluster's workers, --url on a server: pick one")
    source = Activations(Path(args.input), args.input_tensor)
    params = solver_params(args)
    step = args.batch_size or DEFAULT_BATCH_SIZE
    shard_rows = args.shard_rows or DEFAULT_SHARD_ROWS
    with contextlib.closing(backend(args, args.batch_size)) as where:
        if args.ray:
            directions, bias, info = where.dictionary(args.dictionary)
        else:
            solve, info = where.solver(args.dictionary, args.method, params)
        if info["d_model"] != source.d_model:
            raise CLIError(
                f"{args.input} has d_model={source.d_model}; dictionary {info['name']} needs "
                f"{info['d_model']}"
            )
        header = {
            "dictionary": str(info.get("id") or info["name"]),
            "n_features": info["n_features"],
            "method": args.method,
            "params": params,
            "input": source.fingerprint(),
            "shard_rows": shard_rows,
            "batch_size": step,
        }
        writer = CodesWriter(Path(args.output), header, args.resume, args.overwrite)
        pending = writer.pending(source.rows, shard_rows)
        total_shards = len(pending) + len(writer.done)
        done = writer.rows_done
        started = time.perf_counter()
        with (
            tqdm(
                total=source.rows,
                initial=done,
                unit="row",
                file=sys.stderr,
                disable=args.quiet,
                desc="unfold",
            ) as progress,
            interrupted_by_sigterm(),
        ):
            if args.ray:
                from . import cluster

                solved = cluster.unfold_shards(
                    args.ray, directions, bias, args.method, params, Path(args.input),
                    args.input_tensor, pending, step, args.ray_actors,
                )  # fmt: skip
            else:
                solved = unfold_shards(source, pending, step, solve, on_rows=progress.update)
            try:
                for shard, tensors in solved:
                    writer.write(shard.index, shard.start, tensors)
                    if args.ray:
                        progress.update(shard.stop - shard.start)
            except KeyboardInterrupt:
                left = total_shards - len(writer.done)
                print(
                    f"unfold: interrupted with {left} of {total_shards} shards left; run the "
                    "same command with --resume to finish",
                    file=sys.stderr,
                )
                raise
        elapsed = time.perf_counter() - started
    metadata = {
        "dictionary": header["dictionary"],
        "dictionary_name": str(info["name"]),
        "n_features": str(info["n_features"]),
        "method": args.method,
        "params": json.dumps(params),
        "input_shape": json.dumps([*source.shape, source.d_model]),
    }
    output = writer.finish(source.shape, metadata)
    print(summary(writer.shards(), source.rows - done, elapsed, output), file=sys.stderr)
    return 0


@contextlib.contextmanager
def interrupted_by_sigterm():
    """SIGTERM stops `unfold run` as Ctrl-C does: finished shards stay, ready to resume."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary(files: list[Path], solved: int, elapsed: float, output: Path) -> str:
    """One line about the codes written (read back from the diagnostics of their shards, or
    of `output` when it is one file)."""
    from safetensors import safe_open

    import solvers

    opened = [safe_open(path, "np") for path in files or [output]]

    def whole(name: str) -> np.ndarray:
        return np.concatenate([file.get_tensor(name).ravel() for file in opened])

    l0, error, status = whole("l0"), whole("relative_error"), whole("status")
    statuses = np.unique(status, return_counts=True)
    counts = ", ".join(
        f"{count} {solvers.Status(int(code)).name.lower()}"
        for code, count in zip(*statuses, strict=True)
    )
    return (
        f"{l0.size} rows ({solved} solved now in {elapsed:.2f} s, "
        f"{solved / max(elapsed, 1e-9):.0f} rows/s); mean L0 {l0.mean():.2f}; mean relative "
        f"error {error.mean():.4g}; status: {counts}; wrote {output}"
    )


# The parser.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unfold",
        description="Unfold: compressed-sensing unfolding of superposed activations.",
    )
    parser.add_argument("--version", action="version", version=f"unfold {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve",
        help="run the REST service",
        description="Run the REST service (one process: dictionaries, the dynamic batcher and "
        "compiled programs live in its memory). Each option is also an UNFOLD_* environment "
        "variable.",
    )
    serve_parser.add_argument("--host", help="interface (UNFOLD_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (UNFOLD_PORT, default 8000)")
    serve_parser.add_argument("--data-dir", help="data directory (UNFOLD_DATA_DIR, default ./data)")
    serve_parser.set_defaults(handler=serve)

    where = argparse.ArgumentParser(add_help=False)
    group = where.add_argument_group("where the dictionaries are")
    group.add_argument(
        "--url",
        default=os.environ.get("UNFOLD_URL") or None,
        help="an Unfold server, e.g. http://127.0.0.1:8000 (UNFOLD_URL); without one, work "
        "in-process on --data-dir",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("UNFOLD_API_KEY") or None,
        help="the server's API key (UNFOLD_API_KEY)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("UNFOLD_DATA_DIR") or "data"),
        help="local data directory when no --url is given (UNFOLD_DATA_DIR, default ./data); "
        "not one a running server uses",
    )

    dict_parser = commands.add_parser(
        "dict",
        help="add, list, show or remove dictionaries",
        description="Manage dictionaries on a server (--url) or in a local data directory.",
    )
    dict_commands = dict_parser.add_subparsers(dest="dict_command", required=True, metavar="ACTION")
    add = dict_commands.add_parser(
        "add",
        parents=[where],
        help="register a dictionary from a file",
        description="Register a dictionary: a .npy file of shape (n_features, d_model), a "
        ".safetensors file (W_dec/b_dec, its only 2-D tensor, or --tensor/--bias-tensor), or a "
        "SAELens folder (cfg.json + sae_weights.safetensors). With --url, only the directions "
        "and the bias are uploaded (not W_enc), streamed from the file.",
    )
    add.add_argument("name", help="unique name: a letter, then letters, digits, '.', '_', '-'")
    add.add_argument("path", help=".npy, .safetensors, or a SAELens folder")
    add.add_argument("--tensor", help="safetensors: the tensor of directions")
    add.add_argument("--bias-tensor", help="safetensors: the tensor of the bias (d_model,)")
    add.add_argument("--json", action="store_true", help="print the description as JSON")
    add.add_argument(
        "--quiet",
        action="store_true",
        help="no upload progress bar (shown on stderr when it is a terminal, or for uploads of "
        "64 MiB or more)",
    )
    add.set_defaults(handler=dict_add)
    lister = dict_commands.add_parser(
        "list", parents=[where], help="list dictionaries", description="List dictionaries."
    )
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lister.set_defaults(handler=dict_list)
    show = dict_commands.add_parser(
        "show",
        parents=[where],
        help="describe one dictionary",
        description="Print one dictionary's description (JSON).",
    )
    show.add_argument("ref", help="id or name")
    show.set_defaults(handler=dict_show)
    remove = dict_commands.add_parser(
        "rm", parents=[where], help="delete a dictionary", description="Delete a dictionary."
    )
    remove.add_argument("ref", help="id or name")
    remove.set_defaults(handler=dict_rm)

    runner = commands.add_parser(
        "run",
        parents=[where],
        help="unfold a dataset of activations, shard by shard",
        description="Unfold every activation of INPUT (a .npy, .safetensors or .npz file of "
        "shape (batch, d_model), (batch, pos, d_model) or any (..., d_model), or a folder of "
        "such files, read in name order) over dictionary DICTIONARY into OUTPUT: a folder of "
        "safetensors shards with a manifest.json, or one .safetensors file (indices, values, "
        "residual_norm, relative_error, l0, n_iter, status, duality_gap, with the input's "
        "leading shape). Memory stays flat in the number of rows. Interrupted (Ctrl-C, "
        "SIGTERM), the finished shards stay: the same command with --resume finishes the run "
        "with identical results. Prints a summary on stderr.",
    )
    runner.add_argument(
        "dictionary",
        metavar="DICTIONARY",
        help="id or name; in-process also a dictionary file or SAELens folder",
    )
    runner.add_argument(
        "input", metavar="INPUT", help="activations: a .npy, .safetensors or .npz file, or a folder"
    )
    runner.add_argument(
        "output", metavar="OUTPUT", help="the codes: a folder of shards, or a .safetensors file"
    )
    runner.add_argument(
        "--input-tensor", help="the tensor (safetensors) or array (.npz) of INPUT to read"
    )
    runner.add_argument("--method", choices=METHODS, default="omp", help="solver (default omp)")
    runner.add_argument("--k", type=int, help="omp: most atoms per row (server default 8)")
    runner.add_argument(
        "--tol", type=float, help="omp: residual norm to stop at; l1 methods: duality-gap tol"
    )
    runner.add_argument("--alpha", type=float, help="ista/fista/lasso: the l1 penalty")
    runner.add_argument("--max-iter", type=int, help="ista/fista/lasso: iterations per row")
    runner.add_argument("--positive", action="store_true", help="codes >= 0")
    runner.add_argument(
        "--batch-size",
        type=int,
        help=f"rows per solve (default {DEFAULT_BATCH_SIZE}) and, with --url, per request "
        "(default: sized by the client from the dictionary, the method and the server's timeout)",
    )
    runner.add_argument(
        "--shard-rows",
        type=int,
        help=f"rows per output shard (default {DEFAULT_SHARD_ROWS}): the most a resume redoes",
    )
    runner.add_argument(
        "--resume", action="store_true", help="continue an interrupted run into OUTPUT"
    )
    runner.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    runner.add_argument("--quiet", action="store_true", help="no progress bar")
    runner.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=os.environ.get("UNFOLD_RAY_ADDRESS") or None,
        help="solve on the Ray cluster at ADDRESS (host:port, ray://host:port, auto; 'local' "
        "starts one on this machine) with Ray Data, one actor per GPU or per node; every node "
        "reads INPUT at the same path (UNFOLD_RAY_ADDRESS; needs the ray extra)",
    )
    runner.add_argument(
        "--ray-actors", type=int, help="--ray: actors in the pool (default: one per GPU or node)"
    )
    runner.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .client import UnfoldClientError
    from .cluster import ClusterError
    from .errors import UnfoldError

    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("unfold: interrupted", file=sys.stderr)
        return 130
    except (CLIError, UnfoldClientError, ClusterError, OSError, ValueError) as error:
        message = str(error)
    except UnfoldError as error:  # in-process: the same checks the server makes
        message = error.message
    print(f"unfold: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
