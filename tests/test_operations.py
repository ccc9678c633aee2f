"""Safe to operate (issue 13): no admin lockout, "database in use" hints, online backup, retention."""

import asyncio
import json
import uuid
from datetime import datetime, timezone

import pytest
from conftest import assert_error_object, cli, key, new_org
from test_transfer import create_org, stored

import statsd

ORGS = "/api/v2/organizations/"


def orgs_of(database):
    return {o["name"]: o for o in stored(database)[0]}


# ------------------------------------------------------------ no lockout ---

@pytest.mark.parametrize("method,body", [("PATCH", {"is_admin": False}),
                                         ("PUT", {"is_admin": False}),
                                         ("PATCH", {"is_admin": False, "token": "a-brand-new-token-0123"})])
async def test_the_last_admin_cannot_demote_itself(api, method, body):
    resp = await api.request(method, ORGS + "admin/", json=body, headers=key(api.admin))
    error = await assert_error_object(resp, 409, "organizations")
    assert "last admin" in error["error"] and "'admin'" in error["error"]
    org = await (await api.get(ORGS + "admin/", headers=key(api.admin))).json()
    assert org["is_admin"] is True and org["updated_at"] == org["created_at"]
    assert (await api.get(ORGS, headers=key(api.admin))).status == 200  # the old key still works


async def test_the_last_admin_cannot_be_deleted_even_with_cascade(api):
    for params in ({}, {"cascade": "true"}):
        resp = await api.delete(ORGS + "admin/", params=params, headers=key(api.admin))
        error = await assert_error_object(resp, 409, "organizations")
        assert "last admin" in error["error"]
    assert (await api.get(ORGS + "admin/", headers=key(api.admin))).status == 200


async def test_an_admin_may_go_once_another_admin_exists(api):
    boss = await new_org(api, "BOSS", admin=True)
    resp = await api.patch(ORGS + "admin/", json={"is_admin": False}, headers=key(api.admin))
    assert resp.status == 200 and (await resp.json())["is_admin"] is False
    # BOSS is now the only admin: it can neither demote itself nor be deleted
    await assert_error_object(await api.patch(ORGS + "BOSS/", json={"is_admin": False}, headers=key(boss)),
                              409, "organizations")
    await assert_error_object(await api.delete(ORGS + "BOSS/", headers=key(boss)), 409, "organizations")
    # setting is_admin to true again, or rotating the last admin's key, is no demotion
    resp = await api.patch(ORGS + "BOSS/", json={"is_admin": True, "token": "boss-new-token-0123456"},
                           headers=key(boss))
    assert resp.status == 200
    assert (await api.delete(ORGS + "admin/", headers=key("boss-new-token-0123456"))).status == 204


async def test_two_admins_demoting_each_other_at_once_leave_one_admin(api):
    boss = await new_org(api, "BOSS", admin=True)
    answers = await asyncio.gather(
        api.patch(ORGS + "BOSS/", json={"is_admin": False}, headers=key(api.admin)),
        api.patch(ORGS + "admin/", json={"is_admin": False}, headers=key(boss)))
    statuses = sorted(r.status for r in answers)
    assert statuses[0] == 200 and statuses[1] in (403, 409)  # 403: the loser was demoted first
    orgs = await (await api.get(ORGS, headers={**key(api.admin if answers[0].status == 200 else boss)})).json()
    assert sum(o["is_admin"] for o in orgs["data"]) == 1


async def test_ordinary_organizations_are_demoted_and_deleted_as_before(api):
    assert (await api.patch(ORGS + "CASES/", json={"is_admin": False}, headers=key(api.admin))).status == 200
    assert (await api.delete(ORGS + "CASES/", headers=key(api.admin))).status == 204


async def test_with_authentication_off_the_last_admin_may_go(make_client, tmp_path):
    """Anyone manages organizations then; turning authentication on takes a restart, and the
    offline CLI (which keeps the last admin) can make an admin meanwhile."""
    client = await make_client(api_key_authentication=False)
    await new_org(client, "ONLY", admin=True)
    assert (await client.patch(ORGS + "ONLY/", json={"is_admin": False})).status == 200
    assert (await client.patch(ORGS + "ONLY/", json={"is_admin": True})).status == 200
    assert (await client.delete(ORGS + "ONLY/")).status == 204


def test_update_organization_offline(tmp_path):
    database = tmp_path / "statsd.json"
    create_org(database, "ADMIN", "--admin")
    create_org(database, "CASES")
    done = cli("update-organization", "ADMIN", "--no-admin", "--database", str(database))
    assert done.returncode == 1 and "last admin" in done.stderr and "Traceback" not in done.stderr
    done = cli("delete-organization", "ADMIN", "--cascade", "--database", str(database))
    assert done.returncode == 1 and "last admin" in done.stderr
    assert orgs_of(database)["ADMIN"]["is_admin"] is True

    before = orgs_of(database)["CASES"]
    done = cli("update-organization", "CASES", "--admin", "--rotate-token", "--database", str(database))
    assert done.returncode == 0, done.stderr
    new_key = done.stdout.strip().splitlines()[-1]
    after = orgs_of(database)["CASES"]
    assert after["is_admin"] is True and after["token_sha256"] == statsd.hash_token(new_key) != before["token_sha256"]
    assert after["created_at"] == before["created_at"] and after["updated_at"] > before["updated_at"]
    assert new_key not in json.dumps(stored(database))

    done = cli("update-organization", "ADMIN", "--no-admin", "--database", str(database))
    assert done.returncode == 0 and "not admin" in done.stdout
    assert done.stdout.strip().endswith(".")  # no key printed when none was made
    assert orgs_of(database)["ADMIN"]["is_admin"] is False


@pytest.mark.parametrize("args,message", [((), "nothing to change"),
                                          (("--admin", "--no-admin"), "not allowed with"),
                                          (("--admin",), "no organization named 'NOBODY'")])
def test_update_organization_refuses_bad_options_and_changes_nothing(tmp_path, args, message):
    database = tmp_path / "statsd.json"
    create_org(database, "ADMIN", "--admin")
    before = stored(database)
    name = "NOBODY" if message.startswith("no organization") else "ADMIN"
    done = cli("update-organization", name, *args, "--database", str(database))
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert stored(database) == before


# ------------------------------------------------- "database in use" hints ---

LOCKED = [  # command line, what its hint must name
    (("serve", "--port", "1"), "--database"),
    (("create-organization", "NEW"), "POST /api/v2/organizations/"),
    (("list-organizations",), "GET /api/v2/organizations/"),
    (("update-organization", "CASES", "--admin"), "PATCH /api/v2/organizations/CASES/"),
    (("delete-organization", "CASES"), "DELETE /api/v2/organizations/CASES/"),
    (("export",), "statsd export --url URL --token"),
    (("import", "seed.json"), "stopped database"),
    (("push", "--url", "http://127.0.0.1:1", "--token", "x"), "stopped database"),
]


def test_each_command_names_its_own_way_out_of_a_database_in_use(tmp_path, server):
    database = tmp_path / "statsd.json"
    create_org(database, "ADMIN", "--admin")
    create_org(database, "CASES")
    (tmp_path / "seed.json").write_text(json.dumps({"format": "statsd-export", "organizations": [], "stats": []}))
    srv = server(database)
    before = stored(database)
    hints = set()
    for args, named in LOCKED:
        done = cli(*args, "--database", str(database), cwd=tmp_path, timeout=30)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("statsd: error:") and "in use by another statsd process" in line, args
        assert named in line, (args, line)
        if args[0] != "export":
            assert "/api/v2/export" not in line and "--url" not in line, (args, line)
        if args[0] not in ("create-organization", "list-organizations", "update-organization",
                           "delete-organization"):
            assert "/api/v2/organizations/" not in line, (args, line)
        hints.add(line.split(";", 1)[1])
    assert len(hints) == len(LOCKED)  # every command has its own
    srv.stop()
    assert stored(database) == before
