"""``retclip-train``'s command line: read and check the config, then train here or hand over to
``accelerate launch``, and turn every way a run can end into one exit code (retclip_dist/exit_codes.py)
and, for an error, one line.

``--check`` and ``--launch`` check the config once for the whole world before any process starts; under a
bare ``accelerate launch`` every rank checks and rank 0 prints. The training itself is train/loop.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
from pathlib import Path

import torch
import yaml

from retclip_dist.config import ConfigError, load_config, to_dict
from retclip_dist.data.loader import LoaderError
from retclip_dist.exit_codes import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_STOPPED,
)
from retclip_dist.runtime.env import world_info_from_env
from retclip_dist.runtime.health import Health, describe_peers
from retclip_dist.runtime.stop import StoppedInSetup, adopt, catch_early, early_setup
from retclip_dist.train.config import RunConfig
from retclip_dist.train.loop import NonFiniteLoss, train
from retclip_dist.train.preflight import check_run_config
from retclip_dist.train.runlock import RunLock, RunLocked

log = logging.getLogger("retclip_dist.train")


def _say(rank: int, message: str) -> None:
    """One line on stderr; config errors come from rank 0 only, since every rank finds the same one."""
    if rank == 0:
        print(f"retclip-train: {message}", file=sys.stderr, flush=True)


# How gloo words a collective that lost a peer (a plain RuntimeError naming its transport): the peer's
# process ended (its socket closed), or nothing came within train.collective_timeout_s (a frozen node).
_GLOO_LOST = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting")


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away or fell silent."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return "gloo" in text and any(words in text for words in _GLOO_LOST)


def _end_children() -> None:
    # Loader workers ignore SIGTERM (they must outlive a stop signal until the save); on an error they
    # would keep multiprocessing's exit handler waiting forever.
    for child in multiprocessing.active_children():
        child.kill()


def _accelerate_world_size(path: str, num_processes: int | None) -> int:
    if num_processes is not None:
        return num_processes
    try:
        return int(yaml.safe_load(Path(path).read_text())["num_processes"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--launch {path}: cannot read num_processes from it ({exc})") from exc


def _launch_command(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """``accelerate launch`` of this trainer with the same config and overrides, once they are checked."""
    own = {"--launch", "--num_processes", "--main_process_port"}
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in own:
            skip = True
        elif arg.split("=", 1)[0] not in own:
            rest.append(arg)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.launch]
    if args.num_processes is not None:
        cmd += ["--num_processes", str(args.num_processes)]
    if args.main_process_port is not None:
        cmd += ["--main_process_port", str(args.main_process_port)]
    return [*cmd, "-m", "retclip_dist.train", *rest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="retclip-train",
        description="RET-CLIP pretraining. Any config field can be overridden: --section.key value",
    )
    parser.add_argument("--config", help="YAML preset, e.g. configs/retclip_vitb16.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the final config and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, paths and output_dir, then exit (0: fine, 2: not)",
    )
    parser.add_argument(
        "--world-size", type=int, help="with --check: processes the run will have (default 1)"
    )
    parser.add_argument(
        "--launch",
        metavar="ACCELERATE_CONFIG",
        help="check once, then start `accelerate launch` with this config file on the same arguments",
    )
    parser.add_argument(
        "--num_processes", type=int, help="with --launch: override the config's process count"
    )
    parser.add_argument("--main_process_port", type=int, help="with --launch: rendezvous port")
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parser.parse_known_args(argv)
    if not (args.check or args.print_config or args.launch is not None):
        catch_early()  # a run records the stop signals from here on (``python -m`` did so even earlier)
    world = world_info_from_env()
    preflight = args.check or args.launch is not None
    try:
        cfg = load_config(RunConfig, args.config, overrides)
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=1, sort_keys=True))
            return EXIT_OK
        if args.launch is not None:
            world_size = _accelerate_world_size(args.launch, args.num_processes)
        else:
            world_size = args.world_size or world.world_size
        with early_setup("the config check"):  # it reads the checkpoint's data position: a hung file
            check_run_config(cfg, world_size, check_lock=preflight)
    except StoppedInSetup as exc:
        _say(
            world.rank, f"stopped by {exc.name} during {exc.stage}: nothing to save yet, exiting for requeue"
        )
        return EXIT_STOPPED
    except ConfigError as exc:
        _say(0 if preflight else world.rank, str(exc))
        return EXIT_CONFIG
    if args.check:
        print(f"retclip-train: config fine for {world_size} process(es)", flush=True)
        return EXIT_OK
    if args.launch is not None:
        cmd = _launch_command(args, argv)
        os.execv(cmd[0], cmd)  # the launcher takes this process's place: signals and exit code are its
    lock = RunLock(cfg.output_dir) if world.rank == 0 else None
    health = Health(cfg.output_dir, world.rank)
    code, reason = EXIT_FAILED, "an unexpected error (traceback above)"
    try:
        if lock is not None:
            lock.acquire()
        code = train(cfg, args.config, adopt(), lock.release if lock is not None else None)
        reason = {EXIT_OK: "done", EXIT_STOPPED: "stopped by a signal"}.get(code, "")
        return code
    except (ConfigError, RunLocked) as exc:
        _say(world.rank, str(exc))
        code, reason = EXIT_CONFIG, str(exc)
        return code
    except NonFiniteLoss as exc:
        log.error("%s", exc)
        code, reason = EXIT_NONFINITE, str(exc)
        return code
    except LoaderError as exc:
        print(f"retclip-train: rank {world.rank}: {exc}", file=sys.stderr, flush=True)
        code, reason = EXIT_FAILED, str(exc)
        return code
    except RuntimeError as exc:
        if not _lost_peer(exc):
            raise
        # Another rank died (its own line says why) or went silent; this one waited for it in a collective.
        first = str(exc).strip().splitlines()[0]
        peers = describe_peers(cfg.output_dir, world.world_size, world.rank)
        reason = f"lost contact with another rank ({first}); {peers}"
        print(f"retclip-train: rank {world.rank}: {reason}", file=sys.stderr, flush=True)
        code = EXIT_PEER_LOST
        return code
    finally:
        health.exit(code, reason)
        _end_children()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
