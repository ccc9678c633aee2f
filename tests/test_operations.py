"""Safe to operate (issue 13): no admin lockout, "database in use" hints, online backup, retention."""

import asyncio
import json
import os
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


# --------------------------------------------------------- online backup ---

EXPORT = "/api/v2/export"


def batch(writer, number, size, pad=""):
    return [{"type": "risk", "anr": writer, "date": "2024-03-05",
             "data": {"w": writer, "b": number, "i": i, "pad": pad}} for i in range(size)]


async def test_an_export_during_concurrent_writes_is_one_instant_of_the_database(api, tmp_path):
    """Each batch is in the export whole or not at all; every batch acknowledged before the
    export was asked for is in it; batches acknowledged once it had begun are not; the
    server answers them while the export is being streamed; the export imports into a
    fresh database and equals the snapshot."""
    pad = "x" * 600
    for n in range(20):  # about 15 MB to stream: more than the socket buffers hold
        resp = await api.post("/api/v2/stats/", json=batch(-1, n, 1000, pad), headers=key(api.cases))
        assert resp.status == 201
    acked, stop = [], asyncio.Event()

    async def writer(w):
        n = 0
        while not stop.is_set():
            resp = await api.post("/api/v2/stats/", json=batch(w, n, 7), headers=key(api.other))
            assert resp.status == 201
            acked.append((w, n))
            n += 1
    writers = [asyncio.create_task(writer(w)) for w in range(3)]
    while len(acked) < 10:
        await asyncio.sleep(0.01)
    before = set(acked)
    resp = await api.get(EXPORT, headers=key(api.admin))
    assert resp.status == 200 and resp.content_type == "application/json"
    assert resp.headers["Transfer-Encoding"] == "chunked"
    body = [await resp.content.readexactly(1 << 16)]
    started = set(acked)
    after = []
    for n in range(5):  # answered while the export is under way
        post = await api.post("/api/v2/stats/", json=batch(9, n, 7), headers=key(api.other))
        assert post.status == 201
        after.append((9, n))
    assert not resp.content.at_eof()
    body.append(await resp.content.read())
    stop.set()
    await asyncio.gather(*writers)
    document = json.loads(b"".join(body))

    assert document["format"] == "statsd-export" and document["version"] == 1
    assert [o["name"] for o in document["organizations"]] == ["admin", "CASES", "OTHER"]
    assert all(set(o) == {"name", "token_sha256", "is_admin", "created_at", "updated_at"}
               for o in document["organizations"])
    assert int(resp.headers["X-Export-Stats"]) == len(document["stats"])
    sizes = {}
    for doc in document["stats"]:
        tag = (doc["data"]["w"], doc["data"]["b"])
        sizes[tag] = sizes.get(tag, 0) + 1
    assert all(size == (1000 if w == -1 else 7) for (w, _), size in sizes.items())  # whole batches only
    assert before <= set(sizes)
    assert not set(after) & set(sizes)
    assert set(sizes) <= started | {(-1, n) for n in range(20)} | set(acked)
    # the export is the stored records of that instant, byte for byte
    store = api.app[statsd.STORE_KEY]
    now = {d["uuid"]: d for d in store.stats.docs.values()}
    assert all(now[d["uuid"]] == d for d in document["stats"])

    (tmp_path / "backup.json").write_bytes(b"".join(body))
    fresh = tmp_path / "fresh.json"
    done = cli("import", str(tmp_path / "backup.json"), "--database", str(fresh))
    assert done.returncode == 0, done.stderr
    orgs, stats = stored(fresh)
    assert orgs == document["organizations"]
    assert sorted(stats, key=lambda d: d["uuid"]) == sorted(document["stats"], key=lambda d: d["uuid"])


async def test_export_is_for_admins_only_and_takes_no_parameters(api):
    await assert_error_object(await api.get(EXPORT), 401, EXPORT)
    resp = await api.get(EXPORT, headers=key(api.cases))
    error = await assert_error_object(resp, 403, EXPORT)
    assert "admin" in error["error"]
    await assert_error_object(await api.get(EXPORT, params={"x": "1"}, headers=key(api.admin)), 400, EXPORT)
    resp = await api.get(EXPORT + "/", headers=key(api.admin))
    document = await resp.json(content_type=None)
    assert resp.status == 200 and document["stats"] == [] and len(document["organizations"]) == 3
    assert resp.headers["Content-Disposition"].startswith("attachment; filename=\"statsd-export-")


async def test_a_streamed_export_still_carries_the_rate_limit_headers(make_client):
    client = await make_client(rate_limit="5/minute")
    admin = await new_org(client, "admin", admin=True)
    resp = await client.get(EXPORT, headers=key(admin))
    assert resp.status == 200 and resp.headers["X-Rate-Limit-Remaining"] == "4"
    await resp.read()


def test_export_from_a_running_server_equals_the_offline_export_and_restores(tmp_path, server):
    source = tmp_path / "a.json"
    admin = create_org(source, "ADMIN", "--admin")
    create_org(source, "CASES")
    seed = [{"uuid": str(uuid.uuid4()), "anr": str(uuid.uuid4()), "type": kind, "date": "2024-03-05",
             "organization": org, "data": {"n": n, "text": "é\u2028"}}
            for n, (kind, org) in enumerate([("risk", "CASES"), ("threat", "ADMIN")] * 1300)]
    (tmp_path / "seed.json").write_text(json.dumps({"format": "statsd-export", "organizations": [], "stats": seed}))
    assert cli("import", str(tmp_path / "seed.json"), "--database", str(source)).returncode == 0
    srv = server(source)
    for url in (srv.url, srv.url + "/", srv.url + "/api/v2", srv.url + "/api/v2/export"):
        done = cli("export", "--url", url, "--token", admin, "--output", str(tmp_path / "online.json"))
        assert done.returncode == 0, done.stderr
        assert "Exported 2 organization(s) and 2600 stat(s)" in done.stdout
    piped = cli("export", "--url", srv.url, "--token", admin)
    assert piped.returncode == 0 and json.loads(piped.stdout)["format"] == "statsd-export"
    assert srv.stop() == 0
    offline = cli("export", "--database", str(source))
    assert offline.returncode == 0, offline.stderr
    online = json.loads((tmp_path / "online.json").read_text())
    expected, streamed = json.loads(offline.stdout), json.loads(piped.stdout)
    assert list(online) == list(expected)  # the same document, in the same order
    for document in (online, expected, streamed):
        document.pop("exported_at")
    assert online == expected == streamed
    assert not (tmp_path / "online.json.tmp").exists()
    target = tmp_path / "b.json"
    done = cli("import", str(tmp_path / "online.json"), "--database", str(target))
    assert done.returncode == 0, done.stderr
    assert stored(target) == stored(source)


def test_export_from_a_server_fails_clearly_and_leaves_no_file(tmp_path, server):
    database = tmp_path / "a.json"
    admin = create_org(database, "ADMIN", "--admin")
    user = create_org(database, "CASES")
    srv = server(database)
    out = tmp_path / "out.json"
    for args, message in [(("--url", srv.url), "--url and --token go together"),
                          (("--token", admin), "--url and --token go together"),
                          (("--url", "ftp://x", "--token", admin), "http:// or https://"),
                          (("--url", srv.url, "--token", user), "answered 403: Forbidden"),
                          (("--url", srv.url, "--token", "not-a-key-of-this-server"), "answered 401"),
                          (("--url", "http://127.0.0.1:1", "--token", admin), "did not arrive whole")]:
        done = cli("export", *args, "--output", str(out))
        assert done.returncode == 1, (args, done.stdout)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert sorted(os.listdir(tmp_path)) == ["a.json", "a.json.journal", "a.json.lock"], args
    done = cli("export", "--url", srv.url, "--token", admin, "--output", str(tmp_path / "missing" / "out.json"))
    assert done.returncode == 1 and "cannot write" in done.stderr and "Traceback" not in done.stderr
