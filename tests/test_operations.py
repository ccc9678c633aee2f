"""Safe to operate (issue 13): no admin lockout, "database in use" hints, online backup, retention."""

import asyncio
import json
import os
import secrets
import uuid
from datetime import date, datetime, timedelta, timezone

import orjson
import pytest
from conftest import assert_error_object, cli, key, new_org, whole_list
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
    (("purge", "--older-than", "12"), "POST /api/v2/purge"),
    (("remove-duplicates",), "POST /api/v2/remove-duplicates"),
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
    now = {d["uuid"]: orjson.loads(statsd.dumps(d)) for d in store.snapshot()[1]}
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
        done = cli("export", "--url", url, f"--token={admin}", "--output", str(tmp_path / "online.json"))
        assert done.returncode == 0, done.stderr
        assert "Exported 2 organization(s) and 2600 stat(s)" in done.stdout
    piped = cli("export", "--url", srv.url, f"--token={admin}")
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
                          ((f"--token={admin}",), "--url and --token go together"),
                          (("--url", "ftp://x", f"--token={admin}"), "http:// or https://"),
                          (("--url", srv.url, f"--token={user}"), "answered 403: Forbidden"),
                          (("--url", srv.url, "--token=not-a-key-of-this-server"), "answered 401"),
                          (("--url", "http://127.0.0.1:1", f"--token={admin}"), "did not arrive whole")]:
        done = cli("export", *args, "--output", str(out))
        assert done.returncode == 1, (args, done.stdout)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert sorted(os.listdir(tmp_path)) == ["a.json", "a.json.journal", "a.json.lock"], args
    done = cli("export", "--url", srv.url, f"--token={admin}", "--output", str(tmp_path / "missing" / "out.json"))
    assert done.returncode == 1 and "cannot write" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------- retention ---

PURGE, DEDUPE, STATS = "/api/v2/purge", "/api/v2/remove-duplicates", "/api/v2/stats/"


def today():
    return datetime.now(timezone.utc).date()


async def post_stats(api, token, items):
    resp = await api.post(STATS, json=items, headers=key(token))
    assert resp.status == 201, await resp.text()
    return [s["id"] for s in (await resp.json())["data"]]


async def ids_of(api):
    return {s["id"] for s in await whole_list(api, STATS)}


async def test_purge_deletes_what_is_older_than_the_months_given(api):
    old = (today() - timedelta(days=800)).isoformat()
    boundary = statsd.months_before(today(), 12).isoformat()  # exactly 12 months ago: kept
    just_older = (statsd.months_before(today(), 12) - timedelta(days=1)).isoformat()
    old_ids = await post_stats(api, api.cases, [{"type": "risk", "date": old, "data": 1},
                                                {"type": "threat", "date": just_older, "data": 2},
                                                {"type": "risk", "year": 2001, "day": 40, "data": 3}])
    kept = await post_stats(api, api.cases, [{"type": "risk", "date": boundary, "data": 4},
                                             {"type": "risk", "data": 5},  # no date: dated by created_at
                                             {"type": "risk", "date": today().isoformat(), "data": 6}])
    other_old = await post_stats(api, api.other, [{"type": "risk", "date": old, "data": 7}])
    everything = await ids_of(api)

    resp = await api.post(PURGE, json={"older_than": 12, "dry_run": True}, headers=key(api.admin))
    assert resp.status == 200
    report = await resp.json()
    assert report == {"older_than": 12, "before": boundary, "organization": None, "dry_run": True,
                      "matched": 4, "deleted": 0,
                      "organizations": [{"organization": "CASES", "matched": 3, "deleted": 0},
                                        {"organization": "OTHER", "matched": 1, "deleted": 0}]}
    assert await ids_of(api) == everything

    resp = await api.post(PURGE, json={"older_than": 12, "organization": "OTHER"}, headers=key(api.admin))
    report = await resp.json()
    assert (report["matched"], report["deleted"], report["organization"]) == (1, 1, "OTHER")
    assert await ids_of(api) == everything - set(other_old)

    resp = await api.post(PURGE + "/", json={"older_than": 12.0, "dry_run": False}, headers=key(api.admin))
    report = await resp.json()
    assert (report["older_than"], report["matched"], report["deleted"]) == (12, 3, 3)
    assert report["organizations"] == [{"organization": "CASES", "matched": 3, "deleted": 3}]
    assert await ids_of(api) == set(kept)
    assert not set(old_ids) & await ids_of(api)


@pytest.mark.parametrize("body,field", [
    ({}, "older_than"), ({"older_than": -1}, "older_than"), ({"older_than": "12"}, "older_than"),
    ({"older_than": True}, "older_than"), ({"older_than": 1.5}, "older_than"),
    ({"older_than": statsd.MAX_MONTHS + 1}, "older_than"),
    ({"older_than": 1, "organization": 3}, "organization"),
    ({"older_than": 1, "dry_run": "yes"}, "dry_run"), ({"older_than": 1, "months": 2}, "months")])
async def test_purge_refuses_bad_options_and_changes_nothing(api, body, field):
    await post_stats(api, api.cases, [{"type": "risk", "date": "2001-01-01", "data": 1}])
    before = await ids_of(api)
    error = await assert_error_object(await api.post(PURGE, json=body, headers=key(api.admin)), 400, PURGE)
    assert set(error["errors"]) == {field}
    assert await ids_of(api) == before


async def test_purge_of_an_unknown_organization_is_a_404_and_deletes_nothing(api):
    await post_stats(api, api.cases, [{"type": "risk", "date": "2001-01-01", "data": 1}])
    before = await ids_of(api)
    resp = await api.post(PURGE, json={"older_than": 1, "organization": "NOBODY"}, headers=key(api.admin))
    error = await assert_error_object(resp, 404, PURGE)
    assert "'NOBODY'" in error["error"]
    assert await ids_of(api) == before


async def test_retention_calls_are_for_admins_and_take_json_objects(api):
    await post_stats(api, api.cases, [{"type": "risk", "date": "2001-01-01", "data": 1}])
    before = await ids_of(api)
    for path, body in ((PURGE, {"older_than": 0}), (DEDUPE, {})):
        error = await assert_error_object(await api.post(path, json=body, headers=key(api.cases)), 403, path)
        assert "admin" in error["error"]
        await assert_error_object(await api.post(path, json=body), 401, path)
        await assert_error_object(await api.post(path, json=[body], headers=key(api.admin)), 400, path)
        await assert_error_object(await api.post(path, data="older_than=1", headers={
            **key(api.admin), "Content-Type": "application/x-www-form-urlencoded"}), 415, path)
        await assert_error_object(await api.post(path, json=body, params={"dry_run": "true"},
                                                 headers=key(api.admin)), 400, path)
        await assert_error_object(await api.get(path, headers=key(api.admin)), 405, path)
    assert await ids_of(api) == before
    await assert_error_object(await api.post(PURGE, headers=key(api.admin)), 400, PURGE)  # older_than is required
    resp = await api.post(DEDUPE, headers=key(api.admin))  # no body: the defaults
    assert resp.status == 200 and (await resp.json())["matched"] == 0


async def test_a_large_purge_commits_in_chunks_and_lets_other_requests_through(api, db_path):
    old = (today() - timedelta(days=800)).isoformat()
    for _ in range(3):
        await post_stats(api, api.cases, [{"type": "risk", "date": old, "data": i} for i in range(1000)])
    recent = await post_stats(api, api.cases, [{"type": "risk", "data": "recent"}])
    with open(db_path + ".journal", "rb") as f:
        lines_before = f.read().count(b"\n")
    purge = asyncio.create_task(api.post(PURGE, json={"older_than": 1}, headers=key(api.admin)))
    await asyncio.sleep(0)
    cheap = await api.get(STATS + recent[0] + "/", headers=key(api.cases))
    assert cheap.status == 200 and not purge.done()
    report = await (await purge).json()
    assert (report["matched"], report["deleted"]) == (3000, 3000)
    with open(db_path + ".journal", "rb") as f:
        assert f.read().count(b"\n") - lines_before == 3  # one commit per 1000 stats
    assert await ids_of(api) == set(recent)


async def test_a_stat_changed_during_a_purge_is_kept_as_changed(api):
    old = (today() - timedelta(days=800)).isoformat()
    for _ in range(3):
        ids = await post_stats(api, api.cases, [{"type": "risk", "date": old, "data": i} for i in range(1000)])
    purge = asyncio.create_task(api.post(PURGE, json={"older_than": 1}, headers=key(api.admin)))
    await asyncio.sleep(0)
    patched = await api.patch(STATS + ids[-1] + "/", json={"date": today().isoformat()}, headers=key(api.cases))
    report = await (await purge).json()
    left = await whole_list(api, STATS)
    if patched.status == 200:  # the purge met the new record: it is not older than a month
        assert [s["id"] for s in left] == [ids[-1]] and left[0]["date"] == today().isoformat()
        assert (report["matched"], report["deleted"]) == (3000, 2999)
    else:  # the purge deleted it first
        assert patched.status == 404 and left == [] and report["deleted"] == 3000


def record(org, anr, kind, day, created, data=None):
    return statsd.ordered_stat({"uuid": str(uuid.uuid4()), "organization": org, "anr": anr, "type": kind,
                                "date": day, "data": data, "id": secrets.token_hex(12),
                                "created_at": created, "updated_at": created})


async def test_remove_duplicates_keeps_the_newest_of_each_group(api):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    store = api.app[statsd.STORE_KEY]
    docs = [
        record("CASES", a, "risk", "2024-03-05", "2024-03-05T10:00:00.000000"),  # 0 older duplicate
        record("CASES", a, "risk", "2024-03-05", "2024-03-07T10:00:00.000000"),  # 1 newest: kept
        record("CASES", a, "risk", "2024-03-05", "2024-03-06T10:00:00.000000"),  # 2 stored later, created earlier
        record("OTHER", a, "risk", "2024-03-05", "2024-03-01T10:00:00.000000"),  # 3 another organization
        record("CASES", a, "threat", "2024-03-05", "2024-03-01T10:00:00.000000"),  # 4 another type
        record("CASES", a, "threat", "2024-03-05", "2024-03-02T10:00:00.000000"),  # 5 newer of 4
        record("CASES", b, "risk", "2024-03-05", "2024-03-01T10:00:00.000000"),  # 6 another analysis
        record("CASES", a, "risk", "2024-03-06", "2024-03-01T10:00:00.000000"),  # 7 another date
        record("CASES", 7, "risk", "2024-03-06", "2024-03-01T10:00:00.000000"),  # 8 integer anr
        record("CASES", 7, "risk", "2024-03-06", "2024-03-01T10:00:00.000000"),  # 9 same created_at: the later stored is kept
    ]
    no_anr = [{k: v for k, v in record("CASES", a, "risk", "2024-03-05", "2024-03-09T10:00:00.000000").items()
               if k != "anr"} for _ in range(2)]
    await store.commit([("stats", store.stats.new_doc_id(), d) for d in docs + no_anr])
    everything = await ids_of(api)
    doomed = {docs[i]["id"] for i in (0, 2, 4, 8)}

    resp = await api.post(DEDUPE, json={"dry_run": True}, headers=key(api.admin))
    report = await resp.json()
    assert report == {"type": None, "dry_run": True, "groups": 3, "matched": 4, "deleted": 0,
                      "organizations": [{"organization": "CASES", "matched": 4, "deleted": 0}]}
    assert await ids_of(api) == everything

    for kind, matched in (("vulnerability", 0), ("no such type", 0), ("threat", 1)):
        resp = await api.post(DEDUPE, json={"type": kind}, headers=key(api.admin))
        report = await resp.json()
        assert (report["type"], report["matched"], report["deleted"]) == (kind, matched, matched)
    assert await ids_of(api) == everything - {docs[4]["id"]}

    report = await (await api.post(DEDUPE, json={"type": None}, headers=key(api.admin))).json()
    assert (report["groups"], report["matched"], report["deleted"]) == (2, 3, 3)
    assert await ids_of(api) == everything - doomed
    report = await (await api.post(DEDUPE, json={}, headers=key(api.admin))).json()
    assert (report["matched"], report["deleted"]) == (0, 0)  # nothing left to do


@pytest.mark.parametrize("body,field", [({"type": ""}, "type"), ({"type": 3}, "type"), ({"type": "x" * 121}, "type"),
                                        ({"dry_run": 1}, "dry_run"), ({"older_than": 1}, "older_than")])
async def test_remove_duplicates_refuses_bad_options(api, body, field):
    error = await assert_error_object(await api.post(DEDUPE, json=body, headers=key(api.admin)), 400, DEDUPE)
    assert set(error["errors"]) == {field}


def test_purge_and_remove_duplicates_offline(tmp_path):
    database = tmp_path / "statsd.json"
    create_org(database, "ADMIN", "--admin")
    create_org(database, "CASES")
    anr = str(uuid.uuid4())
    old = (today() - timedelta(days=800)).isoformat()
    seed = [{"uuid": str(uuid.uuid4()), "organization": "CASES", "anr": anr, "type": "risk", "date": day,
             "data": n, "created_at": f"2024-01-0{n + 1}T00:00:00.000000"}
            for n, day in enumerate([old, old, old, today().isoformat()])]
    (tmp_path / "seed.json").write_text(json.dumps({"format": "statsd-export", "organizations": [], "stats": seed}))
    assert cli("import", str(tmp_path / "seed.json"), "--database", str(database)).returncode == 0

    done = cli("remove-duplicates", "--dry-run", "--database", str(database))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2 stat(s) duplicated in 1 group(s)") and "dry run, nothing deleted" in done.stdout
    assert len(stored(database)[1]) == 4
    done = cli("remove-duplicates", "--type", "risk", "--database", str(database))
    assert done.returncode == 0 and "2 deleted" in done.stdout
    assert sorted(s["data"] for s in stored(database)[1]) == [2, 3]  # the newest of the old three is kept

    done = cli("purge", "--older-than", "24", "--organization", "CASES", "--dry-run", "--database", str(database))
    assert done.returncode == 0 and done.stdout.startswith("1 stat(s) dated before") and "CASES" in done.stdout
    done = cli("purge", "--older-than", "24", "--database", str(database))
    assert done.returncode == 0 and "1 deleted" in done.stdout
    assert [s["data"] for s in stored(database)[1]] == [3]

    before = stored(database)
    for args, message in ((("purge", "--older-than", "-1"), "--older-than must be"),
                          (("purge",), "required: --older-than"),
                          (("purge", "--older-than", "x"), "invalid int"),
                          (("purge", "--older-than", "1", "--organization", "NOBODY"), "no organization named 'NOBODY'"),
                          (("remove-duplicates", "--type", ""), "--type must be")):
        done = cli(*args, "--database", str(database))
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert stored(database) == before
