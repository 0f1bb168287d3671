"""``whaleid keys``: API keys and their callbacks."""

from __future__ import annotations

import argparse
import logging
import sys

from service.cli.common import Command, arg, sessions_of
from service.errors import NotFound
from service.settings import Settings

log = logging.getLogger("whaleid")


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import create_key

    row, key = create_key(sessions_of(settings), args.name, args.role)
    log.info(
        "created %s key %s for %s; it is shown once, on standard output", row.role, row.id, row.name
    )
    sys.stdout.write(key + "\n")
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import all_keys

    with sessions_of(settings)() as session:
        for k in all_keys(session):
            state = "revoked" if k.revoked_at else "active"
            sys.stdout.write(f"{k.id}\t{k.role}\t{k.name}\t{k.prefix}…\t{state}\n")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import revoke_key

    if not revoke_key(sessions_of(settings), args.key_id):
        raise NotFound(f"key {args.key_id} does not exist")
    return 0


def cmd_keys_callbacks(args: argparse.Namespace, settings: Settings) -> int:
    from service.access.auth import rotate_callback_secret, set_callback_hosts

    factory = sessions_of(settings)
    if args.host is not None:
        row = set_callback_hosts(factory, args.key_id, [h for h in args.host if h.strip()])
        hosts = ", ".join(row.callback_hosts or []) or "nowhere"
        log.info("key %s may send callbacks to: %s", row.id, hosts)
    if args.rotate_secret:
        row, secret = rotate_callback_secret(factory, args.key_id)
        log.info("new callback secret of key %s; it is shown once, on standard output", row.id)
        sys.stdout.write(secret + "\n")
    return 0


COMMANDS = (
    Command(
        ("keys", "create"),
        cmd_keys_create,
        "create an API key (printed once)",
        ("whaleid keys create --role curator --name 'Ana Silva'",),
        (
            arg("--role", required=True, choices=["integration", "curator", "admin"]),
            arg("--name", required=True, help="who the key belongs to"),
        ),
        description="Roles: integration (identify, read), curator (+ decisions and "
        "individuals), admin (+ models, import, keys).",
    ),
    Command(("keys", "list"), cmd_keys_list, "list keys", ("whaleid keys list",)),
    Command(
        ("keys", "revoke"),
        cmd_keys_revoke,
        "revoke a key",
        ("whaleid keys revoke 3",),
        (arg("key_id", type=int),),
    ),
    Command(
        ("keys", "callbacks"),
        cmd_keys_callbacks,
        "a key's callback hosts and secret",
        ("whaleid keys callbacks 3 --host hooks.example.org --rotate-secret",),
        (
            arg("key_id", type=int),
            arg("--host", action="append", default=None, help="a host callbacks may go to"),
            arg("--rotate-secret", action="store_true", help="make a new callback secret"),
        ),
        description="Each integration key sends its jobs' callbacks only to its own hosts, "
        "signed with its own secret. --host replaces the key's hosts (repeat it; --host '' "
        "clears them); --rotate-secret prints a new secret, once, on standard output.",
    ),
)
