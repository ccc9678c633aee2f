"""A stat's `data` is kept in three forms (as written, as loaded from the file, packed):
every answer is the same whichever form a record is in, through writes, packing and restarts."""

import asyncio
from datetime import date

import orjson

import statsd
from conftest import key, new_org
from monarc_data import organization_stats

PROCESSORS = ("threat_average_on_date", "vulnerability_average_on_date", "risk_averages",
              "risk_averages_on_date")


def forms(client) -> dict:
    """How many stats hold their data in each form (read off the real store, to know what is tested)."""
    counts: dict = {}
    for doc in client.app[statsd.STORE_KEY].stats_of():
        name = type(doc["data"]).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


async def pack(client) -> None:
    """Let the store's packer run to the end of what is waiting (the background one may hold a chunk)."""
    store = client.app[statsd.STORE_KEY]
    for _ in range(500):
        await store.packer.pack_waiting()
        if not any(type(doc["data"]) is memoryview or (type(doc["data"]) is bytes and len(doc["data"]) > 2000)
                   for doc in store.stats_of()):  # (long JSON always compresses by a tenth)
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not packed: {forms(client)}")


async def answers(client, token: str, anrs: list) -> dict:
    """What the API answers about the stats: v2 list and one stat, a data__ filter, v1 lists,
    export and every processor."""
    got = {}
    resp = await client.get("/api/v2/stats/", params={"_limit": "1000", "_order_by": "date"}, headers=key(token))
    assert resp.status == 200
    got["v2"] = (await resp.json())["data"]
    first = got["v2"][0]["id"]
    resp = await client.get(f"/api/v2/stats/{first}", headers=key(token))
    got["one"] = await resp.json()
    resp = await client.get("/api/v2/stats/", params={"type": "risk", "_limit": "1000",
                                                     "data__total__current__operational__gt": "60"},
                            headers=key(token))
    got["filtered"] = [s["id"] for s in (await resp.json())["data"]]
    resp = await client.get("/api/v2/stats/", params={"type": "threat", "_limit": "5",
                                                     "_order_by": "-data__0__count,date"}, headers=key(token))
    got["ordered"] = [s["id"] for s in (await resp.json())["data"]]
    for kind in ("threat", "risk"):
        resp = await client.get("/api/v1/stats/", json={"type": kind, "limit": 1000}, headers=key(token))
        assert resp.status == 200
        got[f"v1 {kind}"] = await resp.read()
    resp = await client.get("/api/v2/export", headers=key(token))
    assert resp.status == 200
    export = await resp.json()
    got["export"] = sorted((s["uuid"], orjson.dumps(s["data"])) for s in export["stats"])
    for processor in PROCESSORS:
        kind = "risk" if processor.startswith("risk") else processor.split("_")[0]
        resp = await client.get("/api/v1/stats/processed/", headers=key(token),
                                json={"type": kind, "processor": processor, "anrs": anrs})
        assert resp.status == 200, await resp.text()
        got[processor] = await resp.read()
    base = str(client.make_url("")).rstrip("/").encode()  # each client has its own port
    return {name: orjson.loads(orjson.dumps(value).replace(base, b"BASE")) if name in ("v2", "one") else value
            for name, value in got.items()}


def dictionaries_used(client) -> set:
    """The preset dictionaries (PACK_DICTIONARIES indexes) the packed stats were packed with."""
    return {doc["data"][0] for doc in client.app[statsd.STORE_KEY].stats_of() if type(doc["data"]) is statsd.PackedData}


async def test_answers_are_the_same_in_every_form_of_data(make_client, db_path, monkeypatch):
    monkeypatch.setattr(statsd.UNPACKED, "MAX_BYTES", 20_000)  # the answers' cache starts over often
    monkeypatch.setattr(statsd, "PACK_DICTIONARIES", [b""])  # (other tests' stores used theirs up)
    monkeypatch.setattr(statsd.DataPacker, "SAMPLES", 3)  # each type's first 3 stats make its dictionary
    client = await make_client()
    admin = await new_org(client, "admin", admin=True)
    token = await new_org(client, "CASES")
    anrs, stats = organization_stats(7, 2, date(2026, 11, 30), 60, every=10)
    resp = await client.post("/api/v1/stats/", data=orjson.dumps(stats), headers={**key(token), "Content-Type": "application/json"})
    assert resp.status == 201, await resp.text()
    assert forms(client) == {"bytes": len(stats)}
    written = await answers(client, admin, anrs)

    await pack(client)
    assert forms(client).get("PackedData", 0) > len(stats) // 2, forms(client)  # the long ones are packed
    used = dictionaries_used(client)
    assert 0 in used and len(used - {0}) >= 3, used  # packed before and with their type's dictionary
    assert await answers(client, admin, anrs) == written

    # A write beside packed records, then a restart: the file is read back as memoryviews
    more = organization_stats(8, 1, date(2026, 11, 30), 20, every=10)[1]
    resp = await client.post("/api/v1/stats/", data=orjson.dumps(more), headers={**key(token), "Content-Type": "application/json"})
    assert resp.status == 201
    anrs += sorted({s["anr"] for s in more})
    written = await answers(client, admin, anrs)
    await client.close()

    monkeypatch.setattr(statsd, "BLOCK", 1000)  # the file read in blocks smaller than a line, and larger
    client = await make_client()
    assert forms(client) == {"memoryview": len(stats) + len(more)}
    assert await answers(client, admin, anrs) == written
    await pack(client)
    assert "memoryview" not in forms(client)
    assert len(dictionaries_used(client) - {0}) >= 3  # a new store makes new dictionaries
    assert await answers(client, admin, anrs) == written

    # An update and a delete of packed records, then a restart again
    ids = [s["id"] for s in written["v2"]]
    resp = await client.patch(f"/api/v2/stats/{ids[0]}", json={"data": {"total": {}}}, headers=key(admin))
    assert resp.status == 200, await resp.text()
    resp = await client.delete(f"/api/v2/stats/{ids[1]}", headers=key(admin))
    assert resp.status == 204
    after = await answers(client, admin, anrs)
    assert after["one"]["data"] == {"total": {}}
    await client.close()
    client = await make_client()
    assert await answers(client, admin, anrs) == after
    await client.close()


async def test_freed_memory_goes_back_once_requests_pause(make_client, monkeypatch):
    """_keep_memory trims the C heap after the process grew, only in a pause between requests."""
    trims, size = [], [100 << 20]
    monkeypatch.setattr(statsd, "MEMORY_LOOK", 0.1)
    monkeypatch.setattr(statsd, "resident_bytes", lambda: size[0])
    monkeypatch.setattr(statsd, "release_free_memory", lambda: (trims.append(size[0]), size.__setitem__(0, 90 << 20)))
    client = await make_client()
    token = await new_org(client, "CASES")
    await asyncio.sleep(0.5)
    del trims[:]  # (the packer hands memory back after its first pass too)
    await asyncio.sleep(0.3)
    assert trims == []  # no growth since: nothing to hand back
    resp = await client.get("/api/v1/client/me", headers=key(token))
    size[0] = 200 << 20  # a big answer grew the process
    deadline = asyncio.get_running_loop().time() + 0.5
    while asyncio.get_running_loop().time() < deadline:  # requests keep coming: no trim meanwhile
        resp = await client.get("/api/v1/client/me", headers=key(token))
        assert resp.status == 200
        await asyncio.sleep(0.002)
    assert trims == []
    for _ in range(100):  # then a pause
        if trims:
            break
        await asyncio.sleep(0.05)
    assert trims == [200 << 20]
    await asyncio.sleep(0.3)
    assert trims == [200 << 20]  # back to 90 MB: no second trim


async def test_new_records_wait_for_a_pause_in_the_writes(make_client, monkeypatch):
    """Packing beside writes slows them, so new records stay plain while writes keep landing, are packed
    once the writes pause, and are packed beside the writes once PACK_BACKLOG bytes wait."""
    monkeypatch.setattr(statsd.Store, "PACK_PAUSE", 0.4)
    client = await make_client()
    store = client.app[statsd.STORE_KEY]
    token = await new_org(client, "CASES")
    stats = organization_stats(3, 2, date(2026, 11, 30), 400, every=2)[1]
    headers = {**key(token), "Content-Type": "application/json"}
    sent = iter(range(0, len(stats), 2))

    async def write_for(seconds: float, until=lambda: False) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline and not until():
            i = next(sent, None)
            if i is None:  # every stat sent (the caller's assert then says what did not happen)
                return
            resp = await client.post("/api/v1/stats/", data=orjson.dumps(stats[i:i + 2]), headers=headers)
            assert resp.status == 201, await resp.text()
            await asyncio.sleep(0.01)

    await asyncio.sleep(0.5)  # the packer's first pass (over the loaded records: none) is over
    await write_for(1.5)
    assert set(forms(client)) == {"bytes"}, forms(client)  # writes never paused for a pass: nothing packed
    assert store.packer.waiting_bytes == sum(len(doc["data"]) for doc in store.stats_of()) > 100_000
    for _ in range(600):  # then a pause (a long wait allowed: late in a full test run, with a big heap
        if not store.packer.waiting:  # behind it, the packer's pass has come more than 5 s late)
            break
        await asyncio.sleep(0.05)
    assert "PackedData" in forms(client) and store.packer.waiting_bytes == 0, forms(client)

    monkeypatch.setattr(statsd.Store, "PACK_BACKLOG", 60_000)  # about ten stats of plain data
    before = forms(client)["PackedData"]
    await write_for(15, until=lambda: forms(client)["PackedData"] > before)
    assert forms(client)["PackedData"] > before  # packed while the writes went on
    await client.close()
