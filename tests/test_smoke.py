from conftest import key


async def test_create_then_get(api):
    resp = await api.post("/api/v2/stats/", json={"type": "risk", "data": {"a": 1}}, headers=key(api.cases))
    assert resp.status == 201
    stat = await resp.json()
    resp = await api.get(f"/api/v2/stats/{stat['id']}", headers=key(api.cases))
    assert (await resp.json())["data"] == {"a": 1}
    resp = await api.get(f"/api/v2/stats/{stat['id']}/", headers=key(api.other))
    assert resp.status == 404
