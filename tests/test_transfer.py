"""Moving data: `statsd export`, `statsd import`, and `statsd push` to an upstream service over /api/v1/."""

import json
import os
import pty
import subprocess
import sys
import urllib.request
import uuid

from conftest import ROOT, ServerProcess, cli, key
from tinydb import TinyDB


def create_org(database, name, *extra):
    result = cli("create-organization", name, "--database", str(database), *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def stat(organization, kind="risk", day="2024-03-05", anr=None, data=None, **extra):
    record = {"uuid": str(uuid.uuid4()), "anr": anr or str(uuid.uuid4()), "type": kind, "date": day,
              "data": {"n": 1} if data is None else data, **extra}
    if organization is not None:
        record["organization"] = organization
    return record


def write_export(path, stats, organizations=()):
    path.write_text(json.dumps({"format": "statsd-export", "version": 1, "organizations": list(organizations),
                                "stats": stats}))
    return path


def stored(database):
    """(organizations, stats) of a database file, read by plain TinyDB."""
    db = TinyDB(str(database))
    try:
        return db.table("organizations").all(), db.table("stats").all()
    finally:
        db.close()


def fetch(url, token, path="/api/v2/stats/?_limit=1000"):
    request = urllib.request.Request(url + path, headers=key(token))
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


# --- export and import ---

def test_export_then_import_rebuilds_the_same_database_and_keys_stay_hashed(tmp_path):
    source, target = tmp_path / "a.json", tmp_path / "b.json"
    token = create_org(source, "CASES", "--admin")
    create_org(source, "OTHER")
    write_export(tmp_path / "seed.json", [stat("CASES"), stat("OTHER", kind="threat", data=[1, 2])])
    assert cli("import", str(tmp_path / "seed.json"), "--database", str(source)).returncode == 0
    exported = cli("export", "--database", str(source))
    assert exported.returncode == 0, exported.stderr
    assert token not in exported.stdout
    document = json.loads(exported.stdout)
    assert [o["name"] for o in document["organizations"]] == ["CASES", "OTHER"]
    assert all(len(o["token_sha256"]) == 64 and "token" not in o for o in document["organizations"])
    (tmp_path / "dump.json").write_text(exported.stdout)
    result = cli("import", str(tmp_path / "dump.json"), "--database", str(target))
    assert result.returncode == 0, result.stderr
    assert stored(target) == stored(source)


def test_export_to_a_file(tmp_path, server):
    database = tmp_path / "a.json"
    token = create_org(database, "CASES")
    result = cli("export", "--output", str(tmp_path / "out.json"), "--database", str(database))
    assert result.returncode == 0 and result.stdout.strip().startswith("Exported 1 organization(s)")
    imported = tmp_path / "b.json"
    assert cli("import", str(tmp_path / "out.json"), "--database", str(imported)).returncode == 0
    remote = server(imported)
    me = fetch(remote.url, token, "/api/v1/client/me")
    assert (me["name"], me["token"]) == ("CASES", token)  # the imported hash still accepts the key


def test_export_to_a_folder_says_to_name_a_file(tmp_path):
    database = tmp_path / "a.json"
    create_org(database, "CASES")
    folder = tmp_path / "backups"
    folder.mkdir()
    for output in (str(folder), str(folder) + "/", str(tmp_path / "missing") + "/"):
        result = cli("export", "--output", output, "--database", str(database))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (f"statsd: error: --output {output} is a folder; name the file to write,"
                                         f" e.g. --output {os.path.join(output, 'statsd-export.json')}")
    assert os.listdir(folder) == []
    suggested = os.path.join(str(folder), "statsd-export.json")
    assert cli("export", "--output", suggested, "--database", str(database)).returncode == 0
    assert json.loads(open(suggested).read())["format"] == "statsd-export"


def test_export_into_a_pipe_closed_early_prints_no_error(tmp_path):
    database = tmp_path / "a.json"
    create_org(database, "CASES")
    seed = write_export(tmp_path / "seed.json", [stat("CASES", data={"pad": "x" * 500}) for _ in range(2000)])
    assert cli("import", str(seed), "--database", str(database)).returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "statsd.py"), "export", "--database", str(database)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b'{"format":'  # what `| head -c 10` reads, then it leaves
    proc.stdout.close()
    _, errors = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert errors.decode() == ""  # no "Broken pipe", no traceback, no "Exception ignored"


def test_importing_twice_changes_nothing(tmp_path):
    database = tmp_path / "a.json"
    create_org(database, "CASES")
    seed = write_export(tmp_path / "seed.json", [stat("CASES") for _ in range(3)] + [stat("NEW")],
                        [{"name": "NEW", "token_sha256": "a" * 64, "is_admin": False}])
    first = cli("import", str(seed), "--database", str(database))
    assert first.returncode == 0 and "1 organization(s) and 4 stat(s)" in first.stdout
    before = stored(database)
    second = cli("import", str(seed), "--database", str(database))
    assert second.returncode == 0 and "Imported 0 organization(s) and 0 stat(s)" in second.stdout
    assert stored(database) == before


def test_a_bad_import_file_is_refused_whole(tmp_path):
    database = tmp_path / "a.json"
    create_org(database, "CASES")
    before = stored(database)
    bad_files = {
        "not json": "{",
        "not an export": json.dumps({"stats": []}),
        "bad stat": json.dumps({"format": "statsd-export", "organizations": [],
                                "stats": [stat("CASES"), stat("CASES", day="2024-02-30")]}),
        "unknown org": json.dumps({"format": "statsd-export", "organizations": [], "stats": [stat("NOBODY")]}),
        "twice the same uuid": json.dumps({"format": "statsd-export", "organizations": [],
                                           "stats": [stat("CASES", uuid="1" * 8 + "-1111-4111-8111-" + "1" * 12)] * 2}),
    }
    for what, text in bad_files.items():
        (tmp_path / "bad.json").write_text(text)
        result = cli("import", str(tmp_path / "bad.json"), "--database", str(database))
        assert result.returncode == 1, what
        assert "statsd: error:" in result.stderr, what
        assert stored(database) == before, what


def test_import_refuses_while_a_server_holds_the_database(tmp_path, server):
    database = tmp_path / "a.json"
    create_org(database, "CASES")
    seed = write_export(tmp_path / "seed.json", [stat("CASES")])
    remote = server(database)
    result = cli("import", str(seed), "--database", str(database))
    assert result.returncode == 1 and "in use" in result.stderr
    remote.stop()
    assert stored(database)[1] == []


def test_a_large_import_on_a_terminal_shows_a_progress_bar(tmp_path):
    database = tmp_path / "a.json"
    create_org(database, "CASES")
    seed = write_export(tmp_path / "seed.json", [stat("CASES") for _ in range(6000)])
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "statsd.py"), "import", str(seed), "--database",
                               str(database)], stdout=subprocess.PIPE, stderr=terminal, timeout=120,
                              check=False)
        os.close(terminal)
        terminal = None
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(controller)
    assert proc.returncode == 0
    assert b"importing [" in shown and b"6000/6000" in shown
    quiet = cli("import", str(seed), "--database", str(database))  # not a terminal: no bar
    assert "importing [" not in quiet.stderr
    assert len(stored(database)[1]) == 6000


# --- push ---

def seed_site(tmp_path, stats, *orgs):
    """A local database holding `stats`, with the organizations `orgs` (name, sharing)."""
    database = tmp_path / "site.json"
    records = [{"name": name, "token_sha256": f"{i:064x}", "is_admin": False, "is_sharing_enabled": sharing}
               for i, (name, sharing) in enumerate(orgs, 1)]
    seed = write_export(tmp_path / "seed.json", stats, records)
    assert cli("import", str(seed), "--database", str(database)).returncode == 0
    return database


def remote_service(tmp_path, server, **env):
    database = tmp_path / "remote.json"
    token = create_org(database, "SITE")
    return server(database, env=env), token


def push(database, url, token, *extra):
    return cli("push", "--url", url, "--token", token, "--database", str(database), *extra)


def test_push_sends_the_stats_through_the_v1_batch_post(tmp_path, server):
    anr = str(uuid.uuid4())
    stats = [stat("CASES", kind=kind, anr=anr, data={"kind": kind})
             for kind in ("risk", "threat", "vulnerability", "cartography", "compliance")]
    database = seed_site(tmp_path, stats, ("CASES", True))
    remote, token = remote_service(tmp_path, server)
    result = push(database, remote.url, token, "--chunk-size", "2")
    assert result.returncode == 0, result.stderr
    assert "5 stat(s) stored in 3 chunk(s)" in result.stdout
    got = fetch(remote.url, token)["data"]
    assert [(s["uuid"], s["anr"], s["type"], s["date"], s["data"], s["organization"]) for s in got] == \
        [(s["uuid"], anr, s["type"], s["date"], s["data"], "SITE") for s in stats]


def test_push_resumes_after_a_failure_and_never_sends_twice(tmp_path, server):
    big = {"text": "x" * 3000}
    stats = [stat("CASES", data={"i": i}) for i in range(4)] + [stat("CASES", data=big), stat("CASES")]
    database = seed_site(tmp_path, stats, ("CASES", True))
    remote, token = remote_service(tmp_path, server, STATSD_MAX_BODY_SIZE="2048")
    failed = push(database, remote.url, token, "--chunk-size", "2")
    assert failed.returncode == 1
    assert "413" in failed.stderr and "2 stat(s) not sent" in failed.stderr and "again" in failed.stderr
    assert [s["uuid"] for s in fetch(remote.url, token)["data"]] == [s["uuid"] for s in stats[:4]]
    remote.stop()
    restarted = ServerProcess(tmp_path / "remote.json")  # same address, default max_body_size
    restarted.port = remote.port
    try:
        restarted.start()
        resumed = push(database, remote.url, token, "--chunk-size", "2")
        assert resumed.returncode == 0, resumed.stderr
        assert "2 stat(s) stored in 1 chunk(s), 0 already there" in resumed.stdout
        again = push(database, remote.url, token, "--all")
        assert again.returncode == 0 and "0 stat(s) stored in 1 chunk(s), 6 already there" in again.stdout
        assert [s["uuid"] for s in fetch(remote.url, token)["data"]] == [s["uuid"] for s in stats]
    finally:
        restarted.kill()


def test_push_honours_sharing_and_dates_and_skips_what_v1_cannot_carry(tmp_path, server):
    shared = [stat("CASES", day="2024-03-05"), stat("CASES", day="2024-04-01")]
    stats = shared + [stat("CASES", day="2023-12-31"), stat("PRIVATE", day="2024-03-06"),
                      stat("CASES", kind="weather", day="2024-03-07"), stat("CASES", anr=7, day="2024-03-08")]
    database = seed_site(tmp_path, stats, ("CASES", True), ("PRIVATE", False))
    remote, token = remote_service(tmp_path, server)
    result = push(database, remote.url, token, "--date-from", "2024-01-01", "--date-to", "2024-12-31")
    assert result.returncode == 0, result.stderr
    assert "2 stat(s) stored" in result.stdout
    assert "1 of organizations with sharing disabled, 1 outside the dates, 2 that v1 cannot carry" in result.stdout
    assert [s["uuid"] for s in fetch(remote.url, token)["data"]] == [s["uuid"] for s in shared]


def test_push_with_a_wrong_key_or_bad_options_fails_clearly(tmp_path, server):
    database = seed_site(tmp_path, [stat("CASES")], ("CASES", True))
    remote, token = remote_service(tmp_path, server)
    result = push(database, remote.url, "wrong-key-wrong-key")
    assert result.returncode == 1 and "403" in result.stderr
    for extra in (["--date-from", "2024-02-01", "--date-to", "2024-01-01"], ["--chunk-size", "0"]):
        result = push(database, remote.url, token, *extra)
        assert result.returncode == 1 and "statsd: error:" in result.stderr, extra
    assert fetch(remote.url, token)["data"] == []
