"""Generate CURVE keys for a telemetry link: ``python -m metarl_robot.telemetry.keys <dir>``.

Writes one key pair for the robot and one for the controller, and authorises the controller::

    <dir>/robot.key               robot public key        → copy to the controller
    <dir>/robot.key_secret        robot secret key        → stays on the robot
    <dir>/controller.key          controller public key   → copy into the robot's authorized_clients/
    <dir>/controller.key_secret   controller secret key   → stays on the controller
    <dir>/authorized_clients/controller.key               (the robot accepts exactly these)

Secret files are written with mode 0600. Existing keys are never overwritten unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import zmq
import zmq.auth

from metarl_robot.telemetry.transport import (
    AUTHORIZED_DIR,
    CONTROLLER_PUBLIC_FILE,
    CONTROLLER_SECRET_FILE,
    ROBOT_PUBLIC_FILE,
    ROBOT_SECRET_FILE,
)


def generate_keys(key_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Create the robot and controller key pairs in ``key_dir``; returns name → path of each file written."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support (zmq.has('curve') is False)")
    d = Path(key_dir)
    targets = [d / n for n in (ROBOT_PUBLIC_FILE, ROBOT_SECRET_FILE, CONTROLLER_PUBLIC_FILE, CONTROLLER_SECRET_FILE)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"keys already exist ({', '.join(existing)}); pass --force to replace them "
                              "(every peer then needs the new public keys)")
    d.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(os.fspath(d), "robot")
    zmq.auth.create_certificates(os.fspath(d), "controller")
    for secret in (d / ROBOT_SECRET_FILE, d / CONTROLLER_SECRET_FILE):
        secret.chmod(0o600)
    authorized = d / AUTHORIZED_DIR
    authorized.mkdir(exist_ok=True)
    shutil.copyfile(d / CONTROLLER_PUBLIC_FILE, authorized / CONTROLLER_PUBLIC_FILE)
    return {"robot_public": d / ROBOT_PUBLIC_FILE, "robot_secret": d / ROBOT_SECRET_FILE,
            "controller_public": d / CONTROLLER_PUBLIC_FILE, "controller_secret": d / CONTROLLER_SECRET_FILE,
            "authorized_client": authorized / CONTROLLER_PUBLIC_FILE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metarl_robot.telemetry.keys",
        description="Generate CURVE key pairs for the robot and the controller of a telemetry link, and "
        "authorise the controller. The robot keeps robot.key_secret and authorized_clients/; the controller "
        "keeps controller.key_secret and robot.key. See docs/telemetry.md (CURVE).")
    parser.add_argument("dir", help="folder to write the keys into (created if missing)")
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    args = parser.parse_args(argv)
    try:
        written = generate_keys(args.dir, force=args.force)
    except (FileExistsError, RuntimeError, OSError) as exc:
        print(f"keys: error: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:<18} {path}")
    print("robot:      --curve-keys DIR needs robot.key_secret and authorized_clients/")
    print("controller: CurveClientKeys.from_dir(DIR) needs controller.key_secret and robot.key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
