"""The MONARC /api/v1/ routes: what today's MONARC front office sends, answered as it expects."""

import asyncio
import datetime
import os
import subprocess
import sys
import uuid

import pytest
from conftest import assert_error_object, key

import statsd

MONARC = "MONARC/2.13.1"
TYPES = ("risk", "threat", "vulnerability", "cartography", "compliance")
V1_STAT_KEYS = {"uuid", "anr", "type", "date", "data"}


def monarc(token):
    """The headers the front office's stats client sends."""
    return {"X-API-KEY": token, "User-Agent": MONARC}


def today():
    return datetime.date.today().isoformat()


def risk_data(current_info, current_op=(0, 0, 0), residual_info=(0, 0, 0), residual_op=(0, 0, 0)):
    """A risk stat's data as the front office builds it, from (low, medium, high) counts."""
    def levels(counts):
        return [{"level": name, "value": n} for name, n in zip(("Low risks", "Medium risks", "High risks"), counts)]
    return {"total": {"current": {"informational": sum(current_info), "operational": sum(current_op)},
                      "residual": {"informational": sum(residual_info), "operational": sum(residual_op)}},
            "risks": {"current": {"informational": levels(current_info), "operational": levels(current_op)},
                      "residual": {"informational": levels(residual_info), "operational": levels(residual_op)}}}


def threat_item(object_uuid, label, max_risk, count, average_rate):
    return {"uuid": object_uuid, "label1": label, "label2": label + " (fr)", "label3": "", "label4": "",
            "maxRisk": max_risk, "count": count, "averageRate": average_rate}


def sample_data(kind):
    """Data of the shape the front office sends for each type."""
    if kind == "risk":
        return risk_data((1, 2, 3), (0, 1, 0), (1, 0, 0))
    if kind in ("threat", "vulnerability"):
        return [threat_item(str(uuid.uuid4()), kind, 12, 3, "2.5")]
    if kind == "cartography":
        return {"scales": {"impact": [0, 1, 2], "probability": [0, 1], "likelihood": [0, 2]},
                "risks": {"current": {"informational": {"1": {"2": 3}}, "operational": {}},
                          "residual": {"informational": {}, "operational": {}}}}
    return [{"referential": str(uuid.uuid4()), "label1": "ISO 27002", "label2": "", "label3": "", "label4": "",
             "current": [{"label1": "Policies", "label2": "", "label3": "", "label4": "",
                          "controls": [{"code": "5.1", "measure": "Policies", "value": 3}], "value": 3}],
             "target": []}]


async def v1_errors(resp, status, message=None):
    """A v1 error: the project's JSON error object plus the upstream's "Error" key."""
    target = "stats" if resp.url.path.startswith("/api/v1/stats") else resp.url.path
    body = await assert_error_object(resp, status, target)
    assert body["Error"] == body["error"]
    if message is not None:
        assert body["Error"] == message
    return body


async def post(api, token, items, status=201):
    resp = await api.post("/api/v1/stats/", json=items, headers=monarc(token))
    assert resp.status == status, await resp.text()
    return await resp.json()


async def get(api, token, params, status=200):
    resp = await api.get("/api/v1/stats/", json=params, headers=monarc(token))
    assert resp.status == status, await resp.text()
    return await resp.json()


async def v2_stats(api, token, query=""):
    resp = await api.get(f"/api/v2/stats/?_limit=1000{query}", headers=key(token))
    assert resp.status == 200
    return (await resp.json())["data"]


# --- the collection job, call by call ---

async def test_the_front_office_collection_job(api):
    anrs = [str(uuid.uuid4()), str(uuid.uuid4())]
    day = today()
    # 1. "already collected today?"
    resp = await api.get("/api/v1/stats/", json={"type": "risk", "date_from": day, "date_to": day},
                         headers=monarc(api.cases))
    assert resp.status == 200
    assert await resp.json() == {"metadata": {"count": "0", "offset": "0", "limit": "0"}, "data": []}
    # 2. five stats per analysis, one batch
    sent = [{"anr": anr, "type": kind, "date": day, "data": sample_data(kind)} for anr in anrs for kind in TYPES]
    resp = await api.post("/api/v1/stats/", json=sent, headers=monarc(api.cases))
    assert resp.status == 201
    created = await resp.json()
    assert created["metadata"]["count"] == str(len(sent))
    assert [{k: s[k] for k in ("anr", "type", "date", "data")} for s in created["data"]] == sent
    # 3. read again: today's risk stats are there, in the shape the front office reads
    body = await get(api, api.cases, {"type": "risk", "date_from": day, "date_to": day})
    assert body["metadata"] == {"count": "2", "offset": "0", "limit": "0"}
    assert all(isinstance(v, str) for v in body["metadata"].values())
    risks = [s for s in sent if s["type"] == "risk"]
    assert [{k: s[k] for k in ("anr", "type", "date", "data")} for s in body["data"]] == risks
    for stat in body["data"]:
        assert set(stat) == V1_STAT_KEYS and uuid.UUID(stat["uuid"])
    # 4. an analysis is deleted: its stats go, exactly 204
    resp = await api.delete(f"/api/v1/stats/{anrs[0]}", headers=monarc(api.cases))
    assert resp.status == 204 and await resp.read() == b""
    left = await v2_stats(api, api.cases)
    assert {s["anr"] for s in left} == {anrs[1]} and len(left) == 5
    # 5. the service check and the sharing switch
    resp = await api.get("/api/v1/client/me", headers=monarc(api.cases))
    assert resp.status == 200
    assert await resp.json() == {"name": "CASES", "token": api.cases, "role": "1", "is_sharing_enabled": True}
    resp = await api.patch("/api/v1/client/me", json={"is_sharing_enabled": False}, headers=monarc(api.cases))
    assert resp.status == 200  # one of the 200, 201 and 204 the front office takes; statsd answers 200
    assert await resp.json() == {"name": "CASES", "token": api.cases, "role": "1", "is_sharing_enabled": False}
    resp = await api.get("/api/v1/client/me", headers=monarc(api.cases))
    assert (await resp.json())["is_sharing_enabled"] is False


async def test_every_route_answers_with_and_without_the_trailing_slash(api):
    anr = str(uuid.uuid4())
    for path in ("/api/v1/stats", "/api/v1/stats/"):
        await post(api, api.cases, [{"anr": anr, "type": "risk", "date": today(), "data": {}}])
        resp = await api.get(path, params={"type": "risk"}, headers=monarc(api.cases))
        assert resp.status == 200
    for path in (f"/api/v1/stats/{anr}", f"/api/v1/stats/{anr}/"):
        assert (await api.delete(path, headers=monarc(api.cases))).status == 204
    for path in ("/api/v1/client/me", "/api/v1/client/me/"):
        assert (await api.get(path, headers=monarc(api.cases))).status == 200
    for path in ("/api/v1/stats/processed/list", "/api/v1/stats/processed/list/"):
        assert (await api.get(path)).status == 200


# --- one store for v1 and v2 ---

async def test_a_v1_stat_is_a_v2_stat_with_its_periods_derived_from_its_date(api):
    anr = str(uuid.uuid4())
    created = await post(api, api.cases, [{"anr": anr, "type": "threat", "date": "2021-01-03", "data": [1]}])
    [stat] = await v2_stats(api, api.cases)
    moment = datetime.date(2021, 1, 3)
    assert stat["uuid"] == created["data"][0]["uuid"]
    assert (stat["organization"], stat["anr"], stat["type"], stat["date"], stat["data"]) == \
        ("CASES", anr, "threat", "2021-01-03", [1])
    assert (stat["day"], stat["week"], stat["month"], stat["quarter"], stat["year"]) == \
        (moment.timetuple().tm_yday, moment.isocalendar()[1], 1, 1, 2021)
    assert stat["week"] == 53  # the ISO week of 3 January 2021 belongs to 2020
    for query in ("&week=53", "&month=1&year=2021", "&date=2021-01-03", "&date__gte=2021-01-01"):
        assert len(await v2_stats(api, api.cases, query)) == 1, query
    assert await v2_stats(api, api.cases, "&date__lt=2021-01-03") == []


async def test_a_v2_stat_is_visible_through_v1(api):
    anr = str(uuid.uuid4())
    resp = await api.post("/api/v2/stats/", json={"anr": anr, "type": "risk", "date": "2022-06-30", "data": {"x": 1}},
                          headers=key(api.cases))
    assert resp.status == 201
    v2 = await resp.json()
    body = await get(api, api.cases, {"type": "risk", "date_from": "2022-06-30", "date_to": "2022-06-30"})
    assert body["data"] == [{"uuid": v2["uuid"], "anr": anr, "type": "risk", "date": "2022-06-30", "data": {"x": 1}}]


async def test_a_v2_stat_without_date_is_dated_by_its_year_and_day(api):
    anr = str(uuid.uuid4())
    resp = await api.post("/api/v2/stats/", json={"anr": anr, "type": "risk", "year": 2020, "day": 60, "data": 1},
                          headers=key(api.cases))
    assert resp.status == 201
    body = await get(api, api.cases, {"type": "risk", "get_last": True})
    assert body["data"][0]["date"] == (datetime.date(2020, 1, 1) + datetime.timedelta(days=59)).isoformat()


# --- the date field in v2 ---

async def test_v2_date_is_validated_and_a_bad_one_stores_nothing(api):
    for bad in ("2021-02-30", "2021-2-3", "03/01/2021", 20210103, "2021-01-03T00:00:00"):
        resp = await api.post("/api/v2/stats/", json={"type": "risk", "date": bad, "data": 1}, headers=key(api.cases))
        body = await assert_error_object(resp, 400, "stats")
        assert "date" in body["errors"]
    assert await v2_stats(api, api.cases) == []
    resp = await api.get("/api/v2/stats/?date=2021-13-01", headers=key(api.cases))
    await assert_error_object(resp, 400, "stats")


async def test_v2_explicit_periods_win_over_the_date(api):
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "date": "2021-05-10", "month": 7, "data": 1},
                          headers=key(api.cases))
    stat = await resp.json()
    assert (stat["date"], stat["month"]) == ("2021-05-10", 7)
    assert "day" not in stat and "week" not in stat


async def test_v2_patching_the_date_derives_the_periods_again(api):
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "date": "2021-05-10", "data": 1},
                          headers=key(api.cases))
    stat = await resp.json()
    assert (stat["month"], stat["quarter"]) == (5, 2)
    resp = await api.patch(f"/api/v2/stats/{stat['id']}/", json={"date": "2021-11-02"}, headers=key(api.cases))
    patched = await resp.json()
    assert (patched["date"], patched["month"], patched["quarter"], patched["day"]) == ("2021-11-02", 11, 4, 306)
    resp = await api.patch(f"/api/v2/stats/{stat['id']}/", json={"data": 2}, headers=key(api.cases))
    assert (await resp.json())["month"] == 11


# --- auth and errors ---

async def test_missing_or_empty_key_is_401_with_the_upstream_message(api):
    for headers in ({"User-Agent": MONARC}, {"User-Agent": MONARC, "X-API-KEY": ""}):
        for method, path in (("GET", "/api/v1/stats/"), ("POST", "/api/v1/stats/"), ("GET", "/api/v1/client/me"),
                             ("GET", "/api/v1/stats/processed/"), ("DELETE", f"/api/v1/stats/{uuid.uuid4()}")):
            resp = await api.request(method, path, headers=headers)
            await v1_errors(resp, 401, "Unauthorized - Authentication required.")


async def test_unknown_key_is_403_and_changes_nothing(api):
    await post(api, api.cases, [{"anr": str(uuid.uuid4()), "type": "risk", "date": today(), "data": 1}])
    resp = await api.post("/api/v1/stats/", json=[{"anr": str(uuid.uuid4()), "type": "risk", "date": today(),
                                                   "data": 2}], headers=monarc("not-a-key-of-anybody"))
    await v1_errors(resp, 403, "Forbidden - Authentication failed.")
    resp = await api.get("/api/v1/client/me", headers=monarc("not-a-key-of-anybody"))
    await v1_errors(resp, 403, "Forbidden - Authentication failed.")
    assert len(await v2_stats(api, api.admin)) == 1


@pytest.mark.parametrize("agent, status", [("MONARC/2.10.1", 426), ("MONARC/2.9.15", 426), ("MONARC/2.10", 426),
                                           ("MONARC/2.10.2", 200), ("MONARC/2.11.0", 200), ("curl/8.0", 200)])
async def test_an_old_monarc_gets_426(api, agent, status):
    resp = await api.get("/api/v1/client/me", headers={"X-API-KEY": api.cases, "User-Agent": agent})
    if status == 426:
        body = await v1_errors(resp, 426)
        assert "2.10.2" in body["Error"]
    else:
        assert resp.status == 200


async def test_v1_keeps_the_rate_limit_and_its_headers(make_client):
    from conftest import new_org
    client = await make_client(rate_limit="2/minute")
    token = await new_org(client, "CASES")
    for remaining in ("1", "0"):
        resp = await client.get("/api/v1/client/me", headers=monarc(token))
        assert resp.status == 200 and resp.headers["X-Rate-Limit-Remaining"] == remaining
    resp = await client.get("/api/v1/client/me", headers=monarc(token))
    await v1_errors(resp, 429)
    assert "Retry-After" in resp.headers


async def test_with_authentication_off_no_key_is_needed(make_client):
    from conftest import new_org
    client = await make_client(api_key_authentication=False)
    token = await new_org(client, "CASES")
    anr = str(uuid.uuid4())
    resp = await client.post("/api/v1/stats/", json=[{"anr": anr, "type": "risk", "date": today(), "data": 1}])
    assert resp.status == 201
    resp = await client.post("/api/v1/stats/", json=[{"anr": anr, "type": "risk", "date": today(), "data": 2}],
                             headers=monarc(token))
    assert resp.status == 201
    resp = await client.get("/api/v1/stats/", params={"type": "risk"})
    assert [s["data"] for s in (await resp.json())["data"]] == [1, 2]
    resp = await client.get("/api/v2/stats/")
    assert [s.get("organization") for s in (await resp.json())["data"]] == [None, "CASES"]
    resp = await client.get("/api/v1/client/me", headers=monarc(token))
    assert (await resp.json())["name"] == "CASES"


# --- who sees and deletes what ---

async def test_an_organization_reads_only_its_stats_and_an_admin_reads_all(api):
    anr = str(uuid.uuid4())
    await post(api, api.cases, [{"anr": anr, "type": "risk", "date": today(), "data": "cases"}])
    await post(api, api.other, [{"anr": anr, "type": "risk", "date": today(), "data": "other"}])
    assert [s["data"] for s in (await get(api, api.cases, {"type": "risk"}))["data"]] == ["cases"]
    assert [s["data"] for s in (await get(api, api.other, {"type": "risk"}))["data"]] == ["other"]
    assert [s["data"] for s in (await get(api, api.admin, {"type": "risk"}))["data"]] == ["cases", "other"]


async def test_delete_removes_only_the_callers_stats_of_that_analysis(api):
    anr, kept_anr = str(uuid.uuid4()), str(uuid.uuid4())
    await post(api, api.cases, [{"anr": a, "type": "risk", "date": today(), "data": 1} for a in (anr, kept_anr)])
    await post(api, api.other, [{"anr": anr, "type": "risk", "date": today(), "data": 2}])
    resp = await api.delete(f"/api/v1/stats/{anr}", headers=monarc(api.cases))
    assert resp.status == 204
    assert [(s["organization"], s["anr"]) for s in await v2_stats(api, api.admin)] == \
        [("CASES", kept_anr), ("OTHER", anr)]
    resp = await api.delete(f"/api/v1/stats/{anr}", headers=monarc(api.cases))
    assert resp.status == 204  # nothing left to delete is still a success
    resp = await api.delete("/api/v1/stats/not-a-uuid", headers=monarc(api.cases))
    await v1_errors(resp, 400)
    assert len(await v2_stats(api, api.admin)) == 2


async def test_get_by_analysis_answers_the_callers_stats_of_it_and_an_admin_all(api):
    anr, elsewhere = str(uuid.uuid4()), str(uuid.uuid4())
    mine = await post(api, api.cases, [{"anr": anr, "type": kind, "date": "2024-05-0" + str(i), "data": i}
                                       for i, kind in enumerate(("risk", "threat"), 1)])
    await post(api, api.cases, [{"anr": elsewhere, "type": "risk", "date": today(), "data": "elsewhere"}])
    theirs = await post(api, api.other, [{"anr": anr, "type": "risk", "date": "2024-05-03", "data": "other"}])
    for path in (f"/api/v1/stats/{anr}", f"/api/v1/stats/{anr}/", f"/api/v1/stats/{anr.upper()}"):
        resp = await api.get(path, headers=monarc(api.cases))
        assert resp.status == 200, await resp.text()
        assert await resp.json() == mine["data"]  # a list of v1 stats, oldest first, whatever their type or date
    resp = await api.get(f"/api/v1/stats/{anr}", headers=monarc(api.admin))
    assert await resp.json() == mine["data"] + theirs["data"]
    resp = await api.get(f"/api/v1/stats/{uuid.uuid4()}", headers=monarc(api.cases))
    assert resp.status == 200 and await resp.json() == []
    resp = await api.get("/api/v1/stats/not-a-uuid", headers=monarc(api.cases))
    assert "'not-a-uuid' is not an analysis UUID" in (await v1_errors(resp, 400))["Error"]
    await v1_errors(await api.get(f"/api/v1/stats/{anr}", headers={"User-Agent": MONARC}), 401)
    await v1_errors(await api.get(f"/api/v1/stats/{anr}", headers=monarc("not-a-key-of-anybody")), 403)
    resp = await api.get(f"/api/v1/stats/{anr}", params={"type": "risk"}, headers=monarc(api.cases))
    assert "unknown query parameter 'type'" in (await v1_errors(resp, 400))["Error"]


# --- batch POST ---

async def test_a_partly_failing_batch_is_207_with_per_item_results(api):
    anr = str(uuid.uuid4())
    taken = str(uuid.uuid4())
    await post(api, api.cases, [{"uuid": taken, "anr": anr, "type": "risk", "date": today(), "data": 0}])
    good = {"anr": anr, "type": "threat", "date": today(), "data": [1]}
    items = [good, {"uuid": taken, "anr": anr, "type": "risk", "date": today(), "data": 9},
             {"anr": anr, "type": "weather", "date": "2021-02-30", "data": 1}, {"anr": anr, "type": "risk"}]
    body = await post(api, api.cases, items, status=207)
    assert body["metadata"]["count"] == "1"
    assert [s["type"] for s in body["data"]] == ["threat"]
    assert [r["status"] for r in body["results"]] == [201, 409, 400, 400]
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    assert set(body["results"][2]["errors"]) == {"type", "date"}
    assert set(body["results"][3]["errors"]) == {"date", "data"}
    stored = await v2_stats(api, api.cases)
    assert [(s["type"], s["data"]) for s in stored] == [("risk", 0), ("threat", [1])]


async def test_the_uuids_the_server_gives_are_distinct_random_version_4_uuids(api):
    anr = str(uuid.uuid4())
    given = []
    for _ in range(3):  # 900 stats: more than the server draws from one os.urandom call, several times over
        body = await post(api, api.cases, [{"anr": anr, "type": "risk", "date": today(), "data": i} for i in range(300)])
        given += [s["uuid"] for s in body["data"]]
    parsed = [uuid.UUID(u) for u in given]
    assert all(p.version == 4 and p.variant == uuid.RFC_4122 and str(p) == u for p, u in zip(parsed, given))
    assert len(set(given)) == 900
    assert sorted(s["uuid"] for s in await v2_stats(api, api.cases)) == sorted(given)
    # the random digits differ from uuid to uuid: no position is constant but the version and variant ones
    constant = [i for i in range(36) if len({u[i] for u in given}) == 1]
    assert constant == [8, 13, 14, 18, 23], constant


FORKED_UUIDS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import statsd
statsd.new_uuid()  # the parent's pool of random digits is filled before the fork
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.write(write, " ".join(statsd.new_uuid() for _ in range(100)).encode())
    finally:
        os._exit(0 if sys.exc_info()[0] is None else 1)
os.close(write)
child = b""
while chunk := os.read(read, 65536):
    child += chunk
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the child failed"
child = set(child.decode().split())
assert len(child) == 100, child
print(len(child & {statsd.new_uuid() for _ in range(100)}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_forked_process_does_not_hand_out_the_uuids_of_its_parent():
    """A forking server (or a forked test) must not give two stats the same uuid from a copied pool."""
    done = subprocess.run([sys.executable, "-c", FORKED_UUIDS, os.path.dirname(os.path.abspath(statsd.__file__))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


async def test_an_empty_batch_is_201_and_a_non_list_body_is_400(api):
    body = await post(api, api.cases, [])
    assert body["metadata"]["count"] == "0" and body["data"] == []
    for bad in ({"anr": str(uuid.uuid4()), "type": "risk", "date": today(), "data": 1}, "risk"):
        resp = await api.post("/api/v1/stats/", json=bad, headers=monarc(api.cases))
        await v1_errors(resp, 400)
    resp = await api.post("/api/v1/stats/", data=b"[", headers={**monarc(api.cases),
                                                               "Content-Type": "application/json"})
    await v1_errors(resp, 400)
    assert await v2_stats(api, api.cases) == []


async def test_a_bad_v1_anr_is_called_a_uuid_not_an_integer_or_uuid(api):
    items = [{"anr": bad, "type": "risk", "date": today(), "data": 1} for bad in ("", "x", 12, None, [])]
    body = await post(api, api.cases, items, 207)
    for result in body["results"]:
        assert result["status"] == 400
        assert result["errors"]["anr"] == "must be the analysis' UUID, as a string"
        assert "integer" not in result["error"]
    assert await v2_stats(api, api.cases) == []


async def test_a_batch_may_carry_uuids_and_integer_anrs_are_refused(api):
    given = str(uuid.uuid4())
    body = await post(api, api.cases, [{"uuid": given, "anr": str(uuid.uuid4()), "type": "risk", "date": today(),
                                        "data": 1}, {"anr": 12, "type": "risk", "date": today(), "data": 1}], 207)
    assert body["data"][0]["uuid"] == given
    assert "anr" in body["results"][1]["errors"]


# --- GET parameters ---

async def test_parameters_work_in_the_query_string_as_in_the_body(api):
    anrs = [str(uuid.uuid4()) for _ in range(3)]
    await post(api, api.cases, [{"anr": a, "type": "risk", "date": "2024-01-1" + str(i), "data": i}
                                for i, a in enumerate(anrs)])
    params = {"type": "risk", "anrs": anrs[:2], "date_from": "2024-01-01", "date_to": "2024-01-31"}
    from_body = await get(api, api.cases, params)
    resp = await api.get("/api/v1/stats/", params={**params, "anrs": ",".join(anrs[:2])}, headers=monarc(api.cases))
    assert resp.status == 200
    assert await resp.json() == from_body
    assert [s["data"] for s in from_body["data"]] == [0, 1]


@pytest.mark.parametrize("params, query, reason", [
    ({}, {}, "type is required"), ({"type": "weather"}, {}, "type: 'weather' is not one of"),
    ({"type": "risk", "colour": 1}, {}, "unknown parameter(s): colour"),
    ({"type": "risk"}, {"type": "risk"}, "'type' is given both in the body and in the query string"),
    ({"type": "risk", "date_from": "2024-13-01"}, {}, "date_from: '2024-13-01' is not a date"),
    ({"type": "risk", "anrs": ["x"]}, {}, "anrs: 'x' is not an analysis UUID"),
    ({"type": "risk", "anr": ""}, {}, "anr: '' is not an analysis UUID"),
    ({"type": "risk", "anrs": "abc"}, {}, "anrs must be a list"),
    ({"type": "risk", "limit": -1}, {}, "limit: -1 is not a non-negative integer"),
    ({"type": "risk", "get_last": "maybe"}, {}, "get_last: 'maybe' is not true or false"),
    ({}, {"type": "risk", "offset": "x"}, "offset: 'x' is not a non-negative integer"),
])
async def test_bad_parameters_are_400(api, params, query, reason):
    await post(api, api.cases, [{"anr": str(uuid.uuid4()), "type": "risk", "date": today(), "data": 1}])
    resp = await api.get("/api/v1/stats/", json=params or None, params=query, headers=monarc(api.cases))
    body = await v1_errors(resp, 400)
    assert reason in body["Error"], body["Error"]
    assert "data" not in body and "metadata" not in body


async def test_strings_from_php_are_read_as_upstream_reads_them(api):
    """PHP sends numbers and booleans as strings: numeric strings for offset, limit, group_by_anr and
    local_stats_only, and "true"/"false" (and 1/0, "" for false) for get_last, in the JSON body."""
    anr = str(uuid.uuid4())
    await post(api, api.cases, [{"anr": anr, "type": "risk", "date": today(), "data": i} for i in range(5)])
    body = await get(api, api.cases, {"type": "risk", "offset": "1", "limit": " 2 ", "group_by_anr": "1"})
    assert body["metadata"] == {"count": "2", "offset": "1", "limit": "2"}
    assert [s["data"] for s in body["data"]] == [1, 2]
    for word, last in (("true", True), ("TRUE", True), ("1", True), ("on", True), (1, True), (True, True),
                       ("false", False), ("0", False), ("", False), (0, False), (False, False)):
        body = await get(api, api.cases, {"type": "risk", "get_last": word, "limit": "3"})
        assert [s["data"] for s in body["data"]] == ([4] if last else [0, 1, 2]), word
    data = await processed(api, api.cases, {"type": "risk", "processor": "risk_averages", "local_stats_only": "0"})
    assert data["current"]["informational"] == {"Low risks": 0, "Medium risks": 0, "High risks": 0}
    for params, reason in (({"offset": "1.5"}, "offset: '1.5' is not"), ({"limit": "ten"}, "limit: 'ten' is not"),
                           ({"limit": "-1"}, "limit: '-1' is not"), ({"group_by_anr": "2"}, "group_by_anr: '2'"),
                           ({"get_last": "2"}, "get_last: '2' is not"), ({"get_last": 2}, "get_last: 2 is not"),
                           ({"get_last": []}, "get_last: [] is not"), ({"colour": "1"}, "unknown parameter(s): colour")):
        resp = await api.get("/api/v1/stats/", json={"type": "risk", **params}, headers=monarc(api.cases))
        assert reason in (await v1_errors(resp, 400))["Error"]


async def test_without_dates_the_last_three_months_are_read(api):
    now = datetime.date.today()
    anr = str(uuid.uuid4())
    dates = [now - datetime.timedelta(days=d) for d in (0, 40, 85, 100, 200)]
    dates.append(now + datetime.timedelta(days=1))
    await post(api, api.cases, [{"anr": anr, "type": "risk", "date": d.isoformat(), "data": i}
                                for i, d in enumerate(dates)])
    body = await get(api, api.cases, {"type": "risk"})
    got = [s["date"] for s in body["data"]]
    # three months back is 89 to 92 days back: 85 days is always in, 100 days always out
    assert got == [d.isoformat() for d in dates[:3]]
    only_from = await get(api, api.cases, {"type": "risk", "date_from": dates[4].isoformat()})
    assert len(only_from["data"]) == 5  # date_to defaults to today


async def test_offset_and_limit_page_and_are_echoed_as_strings(api):
    anr = str(uuid.uuid4())
    await post(api, api.cases, [{"anr": anr, "type": "risk", "date": today(), "data": i} for i in range(5)])
    body = await get(api, api.cases, {"type": "risk", "offset": 1, "limit": 2})
    assert body["metadata"] == {"count": "2", "offset": "1", "limit": "2"}
    assert [s["data"] for s in body["data"]] == [1, 2]
    body = await get(api, api.cases, {"type": "risk", "offset": 3})
    assert [s["data"] for s in body["data"]] == [3, 4]


async def test_get_last_returns_each_analysis_latest_stats_whatever_the_dates(api):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await post(api, api.cases, [{"anr": a, "type": "risk", "date": "2019-01-01", "data": "a-old"},
                                {"anr": a, "type": "risk", "date": "2019-06-01", "data": "a-new"},
                                {"anr": b, "type": "risk", "date": "2018-03-01", "data": "b-only"},
                                {"anr": a, "type": "threat", "date": "2020-01-01", "data": "other type"}])
    body = await get(api, api.cases, {"type": "risk", "get_last": True, "date_from": "2024-01-01"})
    assert sorted(s["data"] for s in body["data"]) == ["a-new", "b-only"]
    assert body["metadata"] == {"count": "2", "offset": "0", "limit": "0"}
    body = await get(api, api.cases, {"type": "risk", "get_last": True, "anrs": [b]})
    assert [s["data"] for s in body["data"]] == ["b-only"]


async def test_get_last_keeps_one_stat_per_analysis_the_newest_of_its_latest_date(api):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await post(api, api.cases, [{"anr": a, "type": "risk", "date": "2024-03-01", "data": "a first"},
                                {"anr": a, "type": "risk", "date": "2024-03-01", "data": "a second"},
                                {"anr": a, "type": "risk", "date": "2024-01-01", "data": "a older date"},
                                {"anr": b, "type": "risk", "date": "2024-02-01", "data": "b first"}])
    await post(api, api.cases, [{"anr": b, "type": "risk", "date": "2024-02-01", "data": "b newer"},
                                {"anr": a, "type": "threat", "date": "2024-03-01", "data": "a threat"}])
    body = await get(api, api.cases, {"type": "risk", "get_last": True})
    assert [s["data"] for s in body["data"]] == ["a second", "b newer"]
    assert body["metadata"] == {"count": "2", "offset": "0", "limit": "0"}
    body = await get(api, api.cases, {"type": "threat", "get_last": True})
    assert [s["data"] for s in body["data"]] == ["a threat"]


async def test_get_last_prefers_the_later_created_stat_over_the_later_stored_one(api):
    """A stat imported or pushed late keeps its created_at: newest means created last."""
    anr = str(uuid.uuid4())
    resp = await api.post("/api/v2/stats/", json={"anr": anr, "type": "risk", "date": "2024-03-01", "data": "later"},
                          headers=key(api.cases))
    assert resp.status == 201
    later = await resp.json()
    store = api.app[statsd.STORE_KEY]
    older = {**later, "uuid": str(uuid.uuid4()), "id": "f" * 24, "data": "earlier",
             "created_at": "2001-01-01T00:00:00.000000", "updated_at": "2001-01-01T00:00:00.000000"}
    del older["link"], older["links"]
    await store.commit([("stats", store.stats.new_doc_id(), older)])  # stored after, created before
    body = await get(api, api.cases, {"type": "risk", "get_last": True})
    assert [s["data"] for s in body["data"]] == ["later"]


# --- client/me ---

async def test_client_me_of_an_admin_says_admin(api):
    """The role is upstream's number as a string: "2" admin, "1" user."""
    resp = await api.get("/api/v1/client/me", headers=monarc(api.admin))
    assert await resp.json() == {"name": "admin", "token": api.admin, "role": "2", "is_sharing_enabled": True}
    doc = await (await api.get("/api/v2/openapi.json")).json()
    assert doc["components"]["schemas"]["V1Client"]["properties"]["role"]["enum"] == ["1", "2"]


async def test_client_me_accepts_its_own_body_back_and_refuses_other_changes(api):
    resp = await api.get("/api/v1/client/me", headers=monarc(api.cases))
    me = await resp.json()
    resp = await api.patch("/api/v1/client/me", json={**me, "is_sharing_enabled": False}, headers=monarc(api.cases))
    assert resp.status == 200 and (await resp.json())["is_sharing_enabled"] is False
    for bad in ({"is_sharing_enabled": "no"}, {}, {"is_sharing_enabled": True, "name": "RENAMED"},
                {"is_sharing_enabled": True, "role": "2"}, [True]):
        resp = await api.patch("/api/v1/client/me", json=bad, headers=monarc(api.cases))
        await v1_errors(resp, 400)
    resp = await api.get("/api/v1/client/me", headers=monarc(api.cases))
    assert await resp.json() == {**me, "is_sharing_enabled": False}
    resp = await api.get("/api/v1/client/me", headers=monarc(api.other))
    assert (await resp.json())["is_sharing_enabled"] is True


# --- processed stats ---

T1, T2 = str(uuid.uuid4()), str(uuid.uuid4())
A1, A2 = str(uuid.uuid4()), str(uuid.uuid4())


async def load_processing_set(api):
    """Three threat and three risk stats over two analyses of two organizations, on two dates."""
    await post(api, api.cases, [
        {"anr": A1, "type": "threat", "date": "2024-01-10",
         "data": [threat_item(T1, "Fire", 10, 2, "3.5"), threat_item(T2, "Flood", 4, 1, "1")]},
        {"anr": A1, "type": "threat", "date": "2024-02-10", "data": [threat_item(T1, "Fire", 6, 3, "2")]},
        {"anr": A1, "type": "risk", "date": "2024-01-10", "data": risk_data((2, 4, 6), (1, 0, 3), (1, 1, 0), (0, 0, 1))},
        {"anr": A1, "type": "risk", "date": "2024-02-10", "data": risk_data((6, 2, 1), (1, 1, 1))},
    ])
    await post(api, api.other, [
        {"anr": A2, "type": "threat", "date": "2024-01-10", "data": [threat_item(T1, "Fire", 20, 4, "4.5")]},
        {"anr": A2, "type": "risk", "date": "2024-01-10", "data": risk_data((4, 0, 2), (3, 2, 1), (3, 1, 2), (2, 0, 1))},
    ])


async def processed(api, token, params, status=200):
    resp = await api.get("/api/v1/stats/processed/", json=params, headers=monarc(token))
    if status != 200:
        return await v1_errors(resp, status)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["type"], body["processor"]) == (params["type"], params["processor"])
    return body["data"]


async def test_threat_average_on_date(api):
    await load_processing_set(api)
    data = await processed(api, api.cases, {"type": "threat", "processor": "threat_average_on_date"})
    by_object = {item["object"]: item for item in data}
    assert set(by_object) == {T1, T2}
    fire = by_object[T1]
    assert fire["labels"] == {"label1": "Fire", "label2": "Fire (fr)", "label3": "", "label4": ""}
    assert fire["values"] == [{"count": 3, "maxRisk": 15, "averageRate": 4, "date": "2024-01-10"},
                              {"count": 3, "maxRisk": 6, "averageRate": 2, "date": "2024-02-10"}]
    assert fire["averages"] == pytest.approx({"count": 3, "maxRisk": 12, "averageRate": 10 / 3})
    flood = by_object[T2]
    assert flood["values"] == [{"count": 1, "maxRisk": 4, "averageRate": 1, "date": "2024-01-10"}]
    assert flood["averages"] == {"count": 1, "maxRisk": 4, "averageRate": 1}


async def test_threat_average_on_date_within_dates_and_anrs(api):
    await load_processing_set(api)
    data = await processed(api, api.cases, {"type": "threat", "processor": "threat_average_on_date",
                                            "date_from": "2024-02-01", "date_to": "2024-02-28"})
    assert [(d["object"], d["values"]) for d in data] == \
        [(T1, [{"count": 3, "maxRisk": 6, "averageRate": 2, "date": "2024-02-10"}])]
    data = await processed(api, api.cases, {"type": "threat", "processor": "threat_average_on_date", "anrs": [A2]})
    assert [(d["object"], d["averages"]) for d in data] == [(T1, {"count": 4, "maxRisk": 20, "averageRate": 4.5})]


async def test_vulnerability_average_on_date(api):
    v1, v2 = str(uuid.uuid4()), str(uuid.uuid4())
    await post(api, api.cases, [
        {"anr": A1, "type": "vulnerability", "date": "2024-03-01",
         "data": [threat_item(v1, "Weak password", 8, 5, "1.5"), threat_item(v2, "No backup", 3, 1, "0")]},
        {"anr": A2, "type": "vulnerability", "date": "2024-03-01", "data": [threat_item(v1, "Weak password", 2, 1, "2.5")]},
    ])
    data = await processed(api, api.cases, {"type": "vulnerability", "processor": "vulnerability_average_on_date"})
    by_object = {item["object"]: item for item in data}
    assert by_object[v1]["values"] == [{"count": 3, "maxRisk": 5, "averageRate": 2, "date": "2024-03-01"}]
    assert by_object[v1]["averages"] == {"count": 3, "maxRisk": 5, "averageRate": 2}
    assert by_object[v2]["averages"] == {"count": 1, "maxRisk": 3, "averageRate": 0}


async def test_risk_averages(api):
    await load_processing_set(api)
    data = await processed(api, api.other, {"type": "risk", "processor": "risk_averages"})
    expected = {
        "current": {"informational": {"Low risks": 4, "Medium risks": 2, "High risks": 3},
                    "operational": {"Low risks": 5 / 3, "Medium risks": 1, "High risks": 5 / 3}},
        "residual": {"informational": {"Low risks": 4 / 3, "Medium risks": 2 / 3, "High risks": 2 / 3},
                     "operational": {"Low risks": 2 / 3, "Medium risks": 0, "High risks": 2 / 3}}}
    assert {s: set(k) for s, k in data.items()} == {s: set(k) for s, k in expected.items()}
    for state, kinds in expected.items():
        for kind, levels in kinds.items():
            assert data[state][kind] == pytest.approx(levels), (state, kind)


async def test_risk_averages_on_date(api):
    await load_processing_set(api)
    params = {"type": "risk", "processor": "risk_averages_on_date",
              "processor_params": {"risks_type": "informational", "risks_state": "current"}}
    data = await processed(api, api.cases, params)
    assert data == {"current": {"informational": {
        "Low risks": [{"date": "2024-01-10", "value": 3}, {"date": "2024-02-10", "value": 6}],
        "Medium risks": [{"date": "2024-01-10", "value": 2}, {"date": "2024-02-10", "value": 2}],
        "High risks": [{"date": "2024-01-10", "value": 4}, {"date": "2024-02-10", "value": 1}]}}}
    data = await processed(api, api.cases, {"type": "risk", "processor": "risk_averages_on_date"})
    assert set(data) == {"current", "residual"} and set(data["residual"]) == {"informational", "operational"}
    assert data["residual"]["operational"]["High risks"] == [{"date": "2024-01-10", "value": 1},
                                                            {"date": "2024-02-10", "value": 0}]


async def test_risk_processors_count_only_the_three_named_levels(api):
    data = risk_data((2, 4, 6))
    data["risks"]["current"]["informational"] += [{"level": "Critical risks", "value": 50},
                                                  {"level": "low risks", "value": 50}, {"level": 7, "value": 50}]
    await post(api, api.cases, [{"anr": A1, "type": "risk", "date": "2024-01-10", "data": data}])
    averages = await processed(api, api.cases, {"type": "risk", "processor": "risk_averages"})
    assert averages["current"]["informational"] == {"Low risks": 2, "Medium risks": 4, "High risks": 6}
    on_date = await processed(api, api.cases, {"type": "risk", "processor": "risk_averages_on_date"})
    assert on_date["current"]["informational"] == {
        "Low risks": [{"date": "2024-01-10", "value": 2}], "Medium risks": [{"date": "2024-01-10", "value": 4}],
        "High risks": [{"date": "2024-01-10", "value": 6}]}


async def test_processed_with_no_matching_stats_is_an_empty_list(api):
    data = await processed(api, api.cases, {"type": "risk", "processor": "risk_averages"})
    assert data == []


@pytest.mark.parametrize("params, reason", [
    ({"type": "threat", "processor": "risk_averages"}, "Processor 'risk_averages' can not be used with type 'threat'."),
    ({"type": "risk", "processor": "risk_medians"}, "processor: 'risk_medians' is not one of"),
    ({"type": "risk"}, "processor is required"),
    ({"processor": "risk_averages"}, "type is required"),
    ({"type": "risk", "processor": "risk_averages_on_date", "processor_params": {"risks_type": "strategic"}},
     "risks_type must be informational or operational"),
    ({"type": "risk", "processor": "risk_averages_on_date", "processor_params": {"colour": "red"}},
     "unknown parameter(s) colour"),
    ({"type": "risk", "processor": "risk_averages", "processor_params": {"risks_type": "operational"}},
     "risk_averages takes no parameter"),
    ({"type": "risk", "processor": "risk_averages", "processor_params": "operational"},
     "processor_params must be a JSON object"),
    ({"type": "risk", "processor": "risk_averages", "date_from": "yesterday"}, "date_from: 'yesterday' is not a date"),
])
async def test_bad_processed_requests_are_400(api, params, reason):
    await load_processing_set(api)  # stats the processor would find, were the request right
    body = await processed(api, api.cases, {"type": None, "processor": None, **params}, status=400)
    assert reason in body["Error"], body["Error"]


async def test_the_processors_list_needs_no_key(api):
    resp = await api.get("/api/v1/stats/processed/list")
    assert resp.status == 200
    body = await resp.json()
    assert [p["name"] for p in body] == ["threat_average_on_date", "vulnerability_average_on_date",
                                         "risk_averages", "risk_averages_on_date"]
    assert all(isinstance(p["description"], str) and p["description"] for p in body)


async def test_a_processor_that_is_not_a_name_is_a_400(api):
    for processor in (["risk_averages"], {"a": 1}, 7, None):
        resp = await api.get("/api/v1/stats/processed/", json={"type": "risk", "processor": processor},
                             headers=monarc(api.admin))
        assert resp.status == 400, (processor, resp.status)


async def test_kept_processor_answers_follow_writes_and_stay_within_their_byte_cap(api):
    """A processor's JSON answer is kept until a write changes a sum: asked again, it is the same; after a
    write or a delete it follows; with a cap of about two answers, every answer is still right and the
    kept bytes stay under the cap however often the same answer is computed again."""
    aggregates = api.app[statsd.STORE_KEY].aggregates
    await load_processing_set(api)
    ask = {"type": "threat", "processor": "threat_average_on_date"}
    first = await processed(api, api.cases, ask)
    assert await processed(api, api.cases, ask) == first
    size = aggregates.answer_bytes
    assert size > 0  # (kept)
    aggregates.MAX_ANSWER_BYTES = 2 * size + 100  # about two of these answers
    a3 = str(uuid.uuid4())
    await post(api, api.cases, [{"anr": a3, "type": "threat", "date": "2024-03-10",
                                 "data": [threat_item(T2, "Flood", 8, 5, "2")]}])
    after = {d["object"]: d for d in await processed(api, api.cases, ask)}
    assert after[T2]["values"][-1] == {"count": 5, "maxRisk": 8, "averageRate": 2, "date": "2024-03-10"}
    assert after[T1] == {d["object"]: d for d in first}[T1]
    resp = await api.delete(f"/api/v1/stats/{a3}", headers=monarc(api.cases))
    assert resp.status == 204
    assert await processed(api, api.cases, ask) == first
    ranges = [("2024-01-01", "2024-12-31"), ("2024-02-01", None), (None, "2024-02-28"), ("2024-01-15", None)]
    for round_ in range(3):
        if round_ == 1:
            aggregates.MAX_ANSWER_BYTES = 100 * size  # room for all: the count alone must stay exact
        for date_from, date_to in ranges:
            params = {**ask, **({"date_from": date_from} if date_from else {}), **({"date_to": date_to} if date_to else {})}
            answers = await asyncio.gather(*(processed(api, api.cases, params) for _ in range(3)))
            assert answers[0] == answers[1] == answers[2]
            days = sorted({v["date"] for d in answers[0] for v in d["values"]})
            assert days and all((date_from or "") <= day <= (date_to or "9999") for day in days), (params, days)
            assert aggregates.answer_bytes == sum(len(a) for a in aggregates.answers.values() if a.__class__ is bytes)
            assert aggregates.answer_bytes <= aggregates.MAX_ANSWER_BYTES
        other = str(uuid.uuid4())  # a write and a delete: the same answers are computed and kept again
        await post(api, api.cases, [{"anr": other, "type": "threat", "date": "2024-02-20",
                                     "data": [threat_item(T1, "Fire", 1, 1, "1")]}])
        resp = await api.delete(f"/api/v1/stats/{other}", headers=monarc(api.cases))
        assert resp.status == 204
