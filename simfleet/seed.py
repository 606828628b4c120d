"""Seed a simulated counter's customer database (``counter.db``).

Each simulated counter needs believable customer data so that backups,
restores and post-upgrade checks have something real to protect: customers
with Chinese names, masked resident ID numbers and mobile numbers, their bank
cards, and 90 days of transactions whose running balances add up to each
card's balance. The content is a pure function of (device_id, seed, day), so
two fleets built the same day hold the same data and a test can recompute it.

The schema itself is not defined here: it comes from the counter software's
own ``app/counterdb.py`` (release 1.0.0 baseline, schema version 1), the same
module the counter's ``bin/migrate`` and app use.
"""
from __future__ import annotations

import importlib.util
import random
import sys
from datetime import datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from types import ModuleType

COUNTER_APP_DIR = Path(__file__).resolve().parent / "counter" / "app"

N_CUSTOMERS = 150
N_CARDS = 200
N_TRANSACTIONS = 1500
HISTORY_DAYS = 90

SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严武戴莫孔汤"
)
GIVEN_NAME_CHARS = (
    "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚桂英华建国志红玉萍秀文辉力鹏飞宇浩然子轩欣怡梓涵晨雨思彤"
    "俊佳琳婷雪梅海燕丹凤慧倩颖嘉博瑞泽宁安晓春秋云峰斌鑫磊毅"
)
# Resident ID region code -> district used for the customer's address.
REGIONS = {
    "110101": "北京市东城区",
    "110105": "北京市朝阳区",
    "310104": "上海市徐汇区",
    "310115": "上海市浦东新区",
    "440106": "广州市天河区",
    "440305": "深圳市南山区",
    "320102": "南京市玄武区",
    "330106": "杭州市西湖区",
    "510107": "成都市武侯区",
    "420106": "武汉市武昌区",
    "610113": "西安市雁塔区",
    "370202": "青岛市市南区",
}
STREETS = ("建国路", "人民路", "解放路", "中山路", "长安街", "和平路", "幸福路", "文化路", "新华路", "学府路")
MOBILE_PREFIXES = ("130", "131", "132", "135", "136", "137", "138", "139", "150", "151", "152",
                   "155", "158", "159", "177", "180", "181", "186", "187", "188", "189", "199")
DEBIT_BINS = ("622202", "621700", "622848", "621661", "622588", "621226")  # 19-digit debit cards
CREDIT_BINS = ("625965", "438088", "524091", "622155")  # 16-digit credit cards
CARD_STATUSES = (("active", 85), ("inactive", 5), ("frozen", 4), ("lost", 3), ("closed", 3))
MERCHANTS = ("美团外卖", "京东商城", "中国石化加油站", "国家电网电费", "中国移动话费", "滴滴出行",
             "沃尔玛超市", "星巴克", "盒马鲜生", "12306铁路购票", "自来水公司水费", "拼多多")
FEES = ("年费", "短信服务费", "跨行取款手续费")
# txn_type -> (weight, channels, smallest amount, largest amount) in cents
TXN_KINDS = {
    "deposit": (14, ("counter", "atm"), 10_000, 2_000_000),
    "withdrawal": (14, ("atm", "counter"), 10_000, 500_000),
    "transfer_in": (16, ("mobile", "online", "counter"), 5_000, 1_500_000),
    "transfer_out": (18, ("mobile", "online", "counter"), 5_000, 1_000_000),
    "payment": (34, ("pos", "mobile", "online"), 500, 150_000),
    "fee": (4, ("system",), 200, 5_000),
}
DEBITS = frozenset({"withdrawal", "transfer_out", "payment", "fee"})


@cache
def counterdb() -> ModuleType:
    """The counter software's schema module, loaded from the source tree."""
    path = COUNTER_APP_DIR / "counterdb.py"
    spec = importlib.util.spec_from_file_location("simfleet_counterdb", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def id_check_char(first17: str) -> str:
    """GB 11643 check character of an 18-character resident ID number."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, weights)) % 11]


def ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Generator:
    """Draws every row from one seeded RNG, in a fixed order."""

    def __init__(self, rng: random.Random, as_of: datetime, branch: str, outlet: str) -> None:
        self.rng = rng
        self.as_of = as_of
        self.branch = branch
        self.outlet = outlet
        self._card_numbers: set[str] = set()
        self._customer_since: dict[int, datetime] = {}

    def name(self) -> str:
        given = "".join(self.rng.choices(GIVEN_NAME_CHARS, k=self.rng.choice((1, 2, 2))))
        return self.rng.choice(SURNAMES) + given

    def masked_id_number(self, region: str) -> str:
        birth = datetime(1950, 1, 1) + timedelta(days=self.rng.randrange(365 * 55))
        first17 = f"{region}{birth:%Y%m%d}{self.rng.randrange(1000):03d}"
        return counterdb().mask_id_number(first17 + id_check_char(first17))

    def phone(self) -> str:
        return self.rng.choice(MOBILE_PREFIXES) + f"{self.rng.randrange(10**8):08d}"

    def card_number(self, card_type: str) -> str:
        bins, length = (DEBIT_BINS, 19) if card_type == "debit" else (CREDIT_BINS, 16)
        while True:
            prefix = self.rng.choice(bins)
            body = prefix + "".join(self.rng.choices("0123456789", k=length - len(prefix) - 1))
            number = counterdb().luhn_complete(body)
            if number not in self._card_numbers:
                self._card_numbers.add(number)
                return number

    def moment_before(self, latest: datetime, max_days: int) -> datetime:
        return latest - timedelta(seconds=self.rng.randrange(max_days * 86_400))

    def customers(self) -> list[tuple]:
        rows = []
        for cid in range(1, N_CUSTOMERS + 1):
            region = self.rng.choice(list(REGIONS))
            address = f"{REGIONS[region]}{self.rng.choice(STREETS)}{self.rng.randint(1, 300)}号"
            created = self.moment_before(self.as_of - timedelta(days=HISTORY_DAYS + 30), 365 * 8)
            updated = max(created, self.moment_before(self.as_of, 365))
            self._customer_since[cid] = created
            rows.append((cid, f"C{cid:010d}", self.name(), self.masked_id_number(region), self.phone(),
                         address, self.branch, self.outlet, ts(created), ts(updated)))
        return rows

    def cards(self, customers: list[tuple]) -> list[dict]:
        """Every customer gets one card, a random subset a second one."""
        owners = [c[0] for c in customers]
        owners += self.rng.sample(owners, N_CARDS - len(owners))
        statuses, weights = zip(*CARD_STATUSES)
        cards = []
        for card_id, owner in enumerate(owners, start=1):
            card_type = "credit" if self.rng.random() < 0.2 else "debit"
            opened = self._customer_since[owner] + timedelta(days=self.rng.randrange(30))
            status = self.rng.choices(statuses, weights)[0]
            cards.append({
                "id": card_id, "card_no": self.card_number(card_type), "customer_id": owner,
                "card_type": card_type, "status": status, "opened_at": ts(opened),
                "activated_at": None if status == "inactive" else ts(opened + timedelta(hours=self.rng.randint(1, 72))),
            })
        return cards

    def counterparty(self, kind: str) -> str | None:
        if kind in ("transfer_in", "transfer_out"):
            return f"{self.name()} 尾号{self.rng.randrange(10_000):04d}"
        if kind == "payment":
            return self.rng.choice(MERCHANTS)
        if kind == "fee":
            return self.rng.choice(FEES)
        return None

    def history(self, card: dict, n: int) -> tuple[int, list[tuple]]:
        """``n`` transactions for one card; returns (final balance, rows).

        Debits that would overdraw the card become deposits, so every
        balance_after_cents is non-negative and the last one is the balance.
        """
        balance = self.rng.randrange(0, 5_000_000)
        kinds, weights = list(TXN_KINDS), [spec[0] for spec in TXN_KINDS.values()]
        moments = sorted(self.moment_before(self.as_of, HISTORY_DAYS) for _ in range(n))
        rows = []
        for moment in moments:
            kind = self.rng.choices(kinds, weights)[0]
            _, channels, low, high = TXN_KINDS[kind]
            amount = self.rng.randint(low, high)
            if kind in DEBITS and amount > balance:
                kind, channels = "deposit", TXN_KINDS["deposit"][1]
            signed = -amount if kind in DEBITS else amount
            balance += signed
            txn_id = f"{moment:%Y%m%d}{self.rng.randrange(10**12):012d}"
            rows.append((txn_id, card["id"], kind, signed, balance, self.rng.choice(channels),
                         self.counterparty(kind), ts(moment)))
        return balance, rows

    def transactions(self, cards: list[dict]) -> list[tuple]:
        """Spread N_TRANSACTIONS over cards that have ever been active."""
        used = [card for card in cards if card["status"] != "inactive"]
        activity = [self.rng.uniform(0.2, 3.0) for _ in used]
        counts = dict.fromkeys((card["id"] for card in used), 0)
        for card in self.rng.choices(used, activity, k=N_TRANSACTIONS):
            counts[card["id"]] += 1
        rows = []
        for card in cards:
            card["balance_cents"], card_rows = self.history(card, counts.get(card["id"], 0))
            rows += card_rows
        return sorted(rows, key=lambda row: (row[7], row[1]))


def create_counter_db(
    db_path: Path,
    *,
    device_id: str,
    branch: str,
    outlet: str,
    seed: int | None = None,
    as_of: datetime | None = None,
) -> dict[str, int]:
    """Create ``counter.db`` at schema version 1 with seeded customer data.

    Refuses to touch an existing file: a counter's database is customer data.
    ``as_of`` ends the 90-day transaction window; it defaults to today 00:00
    UTC so the result only depends on (device_id, seed) within a day.
    Returns the number of rows per customer table.
    """
    db_path = Path(db_path)
    if db_path.exists():
        raise FileExistsError(f"{db_path} already exists; refusing to overwrite customer data")
    end = as_of or datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    gen = _Generator(random.Random(f"{device_id}:{seed}"), end, branch, outlet)
    customers = gen.customers()
    cards = gen.cards(customers)
    transactions = gen.transactions(cards)

    db = counterdb()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with db.open_db(db_path, create=True) as conn:
        db.migrate(conn, 1)
        with db.transaction(conn):
            conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", customers)
            conn.executemany(
                """INSERT INTO cards (id, card_no, customer_id, card_type, status, balance_cents, opened_at, activated_at)
                   VALUES (:id, :card_no, :customer_id, :card_type, :status, :balance_cents, :opened_at, :activated_at)""",
                cards,
            )
            conn.executemany(
                """INSERT INTO transactions
                   (txn_id, card_id, txn_type, amount_cents, balance_after_cents, channel, counterparty, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                transactions,
            )
    return {"customers": len(customers), "cards": len(cards), "transactions": len(transactions)}
