#!/usr/bin/env python3
"""conform-broken: kvc-conform must pass kvc-full.so and catch each of the
deliberately broken copies of it (tests/conform/broken.c), each on the test
meant for its defect, without the run stopping there; and its JSON and
JUnit XML must be well formed (the XML valid against conformance/junit.xsd).

usage: conform_broken.py --conform KVC_CONFORM --xsd JUNIT_XSD --workdir DIR
                         full PLUGIN.so [DEFECT PLUGIN.so ...]

Exit status: 0 all good, 1 something was not caught or not well formed,
77 (meson's SKIP) everything else passed but xmllint is missing, so the
JUnit XML could not be checked against its schema.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

GROUPS = ["abi", "lifecycle", "badinput", "semantics", "memory", "accuracy"]
RESULTS = {"passed", "failed", "crashed", "skipped", "warning", "not run"}

# What must catch each defect. `must`: tests that must each end with a
# result in `results` and a reason matching `reason`; `catch`: tests of which
# at least one must. `only`: the --only selection it runs (None: the whole
# quick profile), in which the catching test is not the last one, so the
# report also proves the run went on after the defect bit: every group
# selected reports, and nothing is left unrun. crash and hang, the defects
# that could stop a runner, run everything. `env`: extra environment.
EXPECT = {
    "crash": {
        "only": None,
        "must": [],
        "catch": ["semantics/determinism", "semantics/step_rule", "accuracy/lossless_exact"],
        "results": {"crashed"},
        # under ASan the SEGV handler exits 1: "Early exit with return value 1"
        "reason": r"signal 11|Segmentation|Early exit",
    },
    "leak": {
        "only": "lifecycle",
        "must": ["lifecycle/create_destroy", "lifecycle/many_sequences"],
        "catch": [],
        "results": {"failed"},
        "reason": r"still live",
    },
    "underreport": {
        "only": "memory",
        "must": ["memory/reported_vs_allocated"],
        "catch": [],
        "results": {"failed"},
        "reason": r"under-reported",
    },
    "notruncate": {
        "only": "semantics",
        "must": ["semantics/truncate"],
        "catch": [],
        "results": {"failed"},
        "reason": r"truncate",
    },
    "nan": {
        "only": "accuracy",
        "must": ["accuracy/lossless_exact"],
        "catch": [],
        "results": {"failed"},
        "reason": r"(?i)\bnan\b|finite|\binf\b",
    },
    "export2": {
        "only": "abi",
        "must": ["abi/only_export"],
        "catch": [],
        "results": {"failed"},
        "reason": r"kvc_broken_extra",
    },
    "hang": {
        "only": "semantics",
        "must": ["semantics/determinism", "semantics/step_rule"],
        "catch": [],
        "results": {"failed"},
        "reason": r"hung",
        # Every attend hangs, so every test that attends would wait out its
        # limit (20-90 s each): a twentieth of it here, through Check's
        # multiplier, which kvc-conform honours and reports. After two hung
        # tests (--max-hangs 2, the default) the rest are skipped, saying
        # why: `also` wants such a skip among the results.
        "env": {"CK_TIMEOUT_MULTIPLIER": "0.05"},
        "also": ("skipped", r"hung in 2 earlier tests"),
    },
}

# A safety net per kvc-conform process; the tests' own limits are far lower.
PROCESS_TIMEOUT_S = 400


class Run:
    def __init__(self, name, plugin, only, env):
        self.name, self.plugin, self.only, self.env = name, plugin, only, env
        self.tag = name
        self.rc = None
        self.seconds = 0.0
        self.data = None
        self.errors = []


def kill_session(sid):
    """SIGKILLs every process of session `sid` (Linux /proc)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            if int(st[st.rindex(")") + 2:].split()[3]) == sid:
                os.kill(int(d), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile


LIVE = set()  # sessions (= pids) of the kvc-conform runs under way


def on_signal(signum, frame):
    """meson's timeout (SIGTERM) or ^C: the runs' sessions go too."""
    for sid in list(LIVE):
        kill_session(sid)
    os._exit(128 + signum)


def run_one(args, r):
    base = os.path.join(args.workdir, r.tag)
    r.json_path, r.xml_path, r.log_path = base + ".json", base + ".xml", base + ".log"
    for p in (r.json_path, r.xml_path):
        if os.path.exists(p):
            os.remove(p)
    cmd = [args.conform, r.plugin, "--profile", "quick", "--json", r.json_path,
           "--junit", r.xml_path]
    if r.only:
        cmd += ["--only", r.only]
    env = dict(os.environ)
    env.update(r.env)
    r.cmd = " ".join(cmd)
    t0 = time.monotonic()
    with open(r.log_path, "w") as log:
        log.write("$ " + " ".join(f"{k}={v}" for k, v in r.env.items()) + " " + r.cmd + "\n")
        log.flush()
        # Its own session, so that a stuck run goes with its test children
        # (Check puts each in a process group of its own).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        LIVE.add(proc.pid)
        try:
            r.rc = proc.wait(timeout=PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.wait()
            r.errors.append(f"kvc-conform did not finish in {PROCESS_TIMEOUT_S} s")
        LIVE.discard(proc.pid)
    r.seconds = time.monotonic() - t0
    return r


def check_json(r):
    try:
        with open(r.json_path) as f:
            r.data = json.load(f)
    except (OSError, ValueError) as e:
        r.errors.append(f"JSON report {r.json_path}: {e}")
        return
    d = r.data
    res = d.get("results")
    if not isinstance(res, list) or not isinstance(d.get("summary"), dict):
        r.errors.append("JSON report has no results list or no summary")
        r.data = None
        return
    for x in res:
        if not all(k in x for k in ("group", "test", "result", "reason")):
            r.errors.append(f"JSON result without group/test/result/reason: {x}")
        elif x["result"] not in RESULTS:
            r.errors.append(f"JSON result {x['group']}/{x['test']}: unknown result {x['result']!r}")
    s = d["summary"]
    if s.get("tests") != len(res):
        r.errors.append(f"JSON summary counts {s.get('tests')} tests, results hold {len(res)}")
    # The run went to its end: every group selected reported, nothing left unrun.
    seen = {x.get("group") for x in res}
    for g in [r.only] if r.only else GROUPS:
        if g not in seen:
            r.errors.append(f"no result of group {g}: the run did not complete")
    unrun = [f"{x['group']}/{x['test']}" for x in res if x.get("result") == "not run"]
    if unrun:
        r.errors.append("not run: " + ", ".join(unrun))


def check_xml(r, xmllint, xsd):
    if not os.path.exists(r.xml_path):
        r.errors.append(f"no JUnit XML written at {r.xml_path}")
        return
    if xmllint is None:
        return
    p = subprocess.run([xmllint, "--noout", "--schema", xsd, r.xml_path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        r.errors.append(f"JUnit XML does not validate against {xsd}:\n{p.stdout.strip()}")


def by_name(runs):
    out = {}
    for r in runs:
        for x in (r.data or {}).get("results", []):
            out[f"{x['group']}/{x['test']}"] = x
    return out


def describe(x):
    return f"{x['result']}: {x.get('reason') or ''}".strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conform", required=True)
    ap.add_argument("--xsd", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--jobs", type=int, default=0,
                    help="kvc-conform runs at once (0: one per CPU, plus one for hang, which waits)")
    ap.add_argument("plugins", nargs="+", help="NAME PATH pairs: full, then defects")
    args = ap.parse_args()
    if len(args.plugins) % 2:
        ap.error("plugins come as NAME PATH pairs")
    plugins = dict(zip(args.plugins[0::2], args.plugins[1::2]))
    if "full" not in plugins:
        ap.error("give the control: full PATH")
    unknown = [n for n in plugins if n != "full" and n not in EXPECT]
    if unknown:
        ap.error("no expectation for " + ", ".join(unknown))
    os.makedirs(args.workdir, exist_ok=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    xmllint = shutil.which("xmllint")

    # The control passes the same run, so what fails on a broken plugin is
    # its defect's doing, not the suite's.
    runs = [Run(n, path, EXPECT[n]["only"] if n in EXPECT else None,
                EXPECT.get(n, {}).get("env", {})) for n, path in plugins.items()]
    # The longest (hang, which waits and takes no CPU) first, so the pool
    # ends together.
    runs.sort(key=lambda r: 0 if r.env else 1)

    jobs = args.jobs or min(len(runs), len(os.sched_getaffinity(0)) + ("hang" in plugins))
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda r: run_one(args, r), runs))
    wall = time.monotonic() - t0

    bad = 0
    for name in plugins:
        mine = [r for r in runs if r.name == name]
        for r in mine:
            check_json(r)
            check_xml(r, xmllint, args.xsd)
            if r.rc is not None:
                want_ok = name == "full"
                if want_ok and r.rc != 0:
                    r.errors.append(f"exit status {r.rc}, expected 0")
                if not want_ok and r.rc != 1:
                    r.errors.append(f"exit status {r.rc}, expected 1 (something failed)")
        res = by_name(mine)
        problems = [f"[{r.tag}] {e}" for r in mine for e in r.errors]
        caught = []
        if name == "full":
            for k, x in res.items():
                if x["result"] in ("failed", "crashed"):
                    problems.append(f"{k} {describe(x)}")
        else:
            ex = EXPECT[name]
            pat = re.compile(ex["reason"])

            def hit(k):
                x = res.get(k)
                return x is not None and x["result"] in ex["results"] and \
                    pat.search(x.get("reason") or "") is not None

            for k in ex["must"]:
                if hit(k):
                    caught.append(k)
                else:
                    x = res.get(k)
                    problems.append(f"{k} should be {'/'.join(sorted(ex['results']))} "
                                    f"(reason matching /{ex['reason']}/), got "
                                    + (describe(x) if x else "no result"))
            if "also" in ex:
                want, apat = ex["also"]
                if not any(x["result"] == want and re.search(apat, x.get("reason") or "")
                           for x in res.values()):
                    problems.append(f"no test is {want} with a reason matching /{apat}/")
            if ex["catch"]:
                some = [k for k in ex["catch"] if hit(k)]
                caught += some
                if not some:
                    problems.append("none of " + ", ".join(ex["catch"]) + " is " +
                                    "/".join(sorted(ex["results"])) +
                                    f" with a reason matching /{ex['reason']}/: " +
                                    "; ".join(f"{k} {describe(res[k])}" if k in res
                                              else f"{k} no result" for k in ex["catch"]))
        secs = " + ".join(f"{r.seconds:.1f}" for r in mine)
        if problems:
            bad += 1
            print(f"FAIL {name} ({secs} s)")
            for p in problems:
                print("    " + p)
            for r in mine:
                print(f"    log: {r.log_path}")
        else:
            print(f"ok   {name} ({secs} s)")
            for k in caught:
                print(f"       caught by {k}: {describe(res[k])}")
    print(f"{len(runs)} kvc-conform runs, {jobs} at a time, in {wall:.1f} s")
    if bad:
        return 1
    if xmllint is None:
        print("SKIP: xmllint not found (Debian: libxml2-utils): JUnit XML not checked "
              "against its schema")
        return 77
    return 0


if __name__ == "__main__":
    sys.exit(main())
