"""The post-install checks of the floor and the peers, standard library only, so the same file
runs on this machine (imported by bench/floor.py) and on a counter (`python3 -c "$(cat ...)"`):

    business_test.py health HOST PORT VERSION   wait (≤ 30 s) until /health says ok on VERSION
    business_test.py business HOST PORT         card opening, activation, transfer, account change

The business calls and expected results are exactly tasks/checks.py's `business_test`
(test mode: `test_` tables; /test/reset afterwards). Exit status 1 with the problems on stderr.
"""
import json
import sys
import time
import urllib.error
import urllib.request

TEST_CUSTOMER = {"customer_name": "测试客户", "id_number": "110101199003071234", "phone": "13800138000"}
TRANSFER_CENTS = 2_500


def _call(base, path, body=None, timeout=10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(host, port, version, timeout=30.0, interval=0.5):
    """[] once /health answers status ok on ``version``; else what it last said."""
    base, deadline, last = f"http://{host}:{port}", time.monotonic() + timeout, None
    while True:
        try:
            last = _call(base, "/health", timeout=5.0)
            if last.get("status") == "ok" and last.get("version") == version:
                return []
        except (OSError, ValueError) as e:
            last = repr(e)
        if time.monotonic() > deadline:
            return [f"/health after {timeout:g} s: {last!r}, expected status ok on {version}"]
        time.sleep(interval)


def business(host, port):
    """The problems found by the business test (empty when it passed)."""
    base, problems = f"http://{host}:{port}", []

    def expect(service, got, want, what):
        if got != want:
            problems.append(f"{service}: {what} is {got!r}, expected {want!r}")

    try:
        a = _call(base, "/test/card/open", TEST_CUSTOMER)
        b = _call(base, "/test/card/open", dict(TEST_CUSTOMER, phone="13900139000"))
        expect("card_opening", a.get("status"), "inactive", "new card status")
        for card in (a, b):
            done = _call(base, "/test/card/activate", {"card_no": card["card_no"]})
            expect("card_activation", done.get("status"), "active", "card status")
        t = _call(base, "/test/transfer", {"from_card": a["card_no"], "to_card": b["card_no"], "amount_cents": TRANSFER_CENTS})
        expect("transfer", t.get("from_balance_cents"), a["balance_cents"] - TRANSFER_CENTS, "payer's balance")
        expect("transfer", t.get("to_balance_cents"), b["balance_cents"] + TRANSFER_CENTS, "payee's balance")
        u = _call(base, "/test/account/update", {"card_no": a["card_no"], "phone": "13700137000"})
        expect("account_change", u.get("phone"), "13700137000", "phone after change")
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        try:
            _call(base, "/test/reset", {})
        except (OSError, ValueError):
            pass
    return problems


def main(argv):
    if len(argv) == 4 and argv[0] == "health":
        problems = wait_healthy(argv[1], int(argv[2]), argv[3])
    elif len(argv) == 3 and argv[0] == "business":
        problems = business(argv[1], int(argv[2]))
    else:
        sys.exit("usage: business_test.py health HOST PORT VERSION | business HOST PORT")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
