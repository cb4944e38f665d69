#!/usr/bin/env python3
"""Generate the klantreis demo data set.

Writes, next to this script:
  customers.jsonl  ~300 Dutch/Belgian webshop customers with attributes and event history
  customers.csv    20 customers, attributes only (shows CSV import; tags comma-separated)

Python 3 standard library only. Deterministic: a fixed seed and a FIXED reference time
REF = 2026-11-20T12:00:00Z; all events are dated relative to REF (up to ~18 months back)
and never after it. Evaluate the demo at that moment:

    klantreis eval --now 2026-11-20T12:00:00Z examples/customers.jsonl

The customers are drawn from archetypes (visitor, browser, cart, open order, recently
delivered, loyal, lapsed, unhappy, ...) so that at REF every phase of every preset in
rules/ has customers, with a realistic funnel: many kijk/kies, fewer koop/krijg, a healthy
koester group, some lapsed, and ~15% with service tickets (some with a low CSAT/NPS).
orders_count and total_spent are consistent with the order events (total_spent excludes
refunded orders).
"""

import csv
import json
import os
import random
import unicodedata
from datetime import datetime, timedelta, timezone

SEED = 20261120
REF = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)
N_CUSTOMERS = 300
HERE = os.path.dirname(os.path.abspath(__file__))

NL_FIRST = [
    "Sanne", "Daan", "Emma", "Bram", "Lotte", "Thijs", "Julia", "Sem", "Fleur", "Lucas",
    "Anouk", "Jesse", "Iris", "Ruben", "Sophie", "Lars", "Eva", "Niels", "Lisa", "Tim",
    "Femke", "Joost", "Noor", "Milan", "Maud", "Stijn", "Anne", "Koen", "Roos", "Jeroen",
    "Esther", "Wouter", "Marieke", "Pieter", "Ilse", "Bas", "Yara", "Finn", "Tess", "Mohamed",
    "Fatima", "Sven", "Linda", "Gert-Jan", "Annelies", "Youssef", "Mila", "Hugo", "Saskia", "Rick",
]
NL_LAST = [
    "de Vries", "Jansen", "de Jong", "Bakker", "Visser", "Smit", "Meijer", "de Boer", "Mulder",
    "de Groot", "Bos", "Vos", "Peters", "Hendriks", "van Dijk", "van den Berg", "Dekker",
    "Brouwer", "de Wit", "Dijkstra", "Smits", "de Graaf", "van der Meer", "Kok", "Jacobs",
    "van Leeuwen", "Verhoeven", "Kramer", "Willems", "Postma", "Koster", "Prins", "Huisman",
    "van der Linden", "El Amrani", "Yilmaz", "Hoekstra", "Schouten", "Vermeulen", "de Haan",
]
NL_CITIES = [
    "Amsterdam", "Rotterdam", "Den Haag", "Utrecht", "Eindhoven", "Groningen", "Tilburg",
    "Almere", "Breda", "Nijmegen", "Arnhem", "Haarlem", "Enschede", "Amersfoort", "Zwolle",
    "Leiden", "Maastricht", "Dordrecht", "Zoetermeer", "'s-Hertogenbosch", "Delft", "Alkmaar",
    "Leeuwarden", "Deventer", "Hilversum", "Apeldoorn", "Gouda", "Assen",
]
BE_FIRST = [
    "Lien", "Wout", "Elke", "Jens", "Hanne", "Pieter-Jan", "Nele", "Arne", "Sofie", "Kobe",
    "Ine", "Tom", "Lore", "Seppe", "Marie", "Wannes", "Jolien", "Brecht", "Louise", "Matthias",
]
BE_LAST = [
    "Peeters", "Janssens", "Maes", "Jacobs", "Mertens", "Willems", "Claes", "Goossens",
    "Wouters", "De Smet", "Dubois", "Lambert", "Dupont", "Van Damme", "De Clercq", "Vermeersch",
    "Declercq", "Verstraete", "Van de Velde", "Hermans",
]
BE_CITIES = [
    "Antwerpen", "Gent", "Brugge", "Leuven", "Mechelen", "Hasselt", "Kortrijk", "Aalst",
    "Sint-Niklaas", "Brussel", "Genk", "Oostende",
]
OTHER_PLACES = [  # a few customers abroad
    ("Londen", "Europe/London"), ("Berlijn", "Europe/Berlin"), ("Willemstad", "America/Curacao"),
    ("Parijs", "Europe/Paris"), ("Oranjestad", "America/Aruba"),
]

PRODUCTS = [  # (sku, name, price)
    ("KOF-101", "Koffiebonen Espresso 1kg", 18.95), ("KOF-205", "Melkopschuimer", 39.00),
    ("KEU-310", "Koekenpan 28cm", 44.50), ("KEU-322", "Messenset 5-delig", 89.00),
    ("TUI-401", "Tuinslang 25m", 29.95), ("TUI-455", "Loungeset Lissabon", 649.00),
    ("HUI-512", "Dekbedovertrek katoen", 49.95), ("HUI-530", "Plaid wafelstof", 34.95),
    ("ELE-611", "Waterkoker retro", 59.00), ("ELE-640", "Stofzuiger steelmodel", 229.00),
    ("ELE-690", "Wasmachine 8kg", 549.00), ("FIE-701", "Fietstas waterdicht", 69.95),
    ("FIE-733", "Fietsverlichting set", 24.95), ("SPO-802", "Yogamat", 27.50),
    ("SPO-850", "Hardloopschoenen", 119.00), ("BOE-901", "Kookboek Hollandse pot", 24.99),
]
SEARCHES = [
    "koffiebonen", "waterkoker", "stofzuiger snoerloos", "fietstas", "loungeset", "koekenpan inductie",
    "dekbed 2 persoons", "hardloopschoenen dames", "wasmachine 8kg", "cadeau sinterklaas",
]
PAGES = ["/", "/aanbiedingen", "/blog/koffie-zetten", "/klantenservice", "/over-ons", "/nieuw", "/blog/tuin-winterklaar"]
CAMPAIGNS = [("google", "zoek-merk"), ("meta", "black-friday"), ("meta", "retargeting"), ("google", "shopping"), ("tiktok", "najaar")]
SUBJECTS = [
    "Waar blijft mijn pakket?", "Product kapot aangekomen", "Retour aanmelden", "Vraag over factuur",
    "Verkeerde maat ontvangen", "Garantie aanvraag", "Installatie wasmachine", "Klacht over bezorger",
]


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def ascii_slug(text):
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in text.lower() if ch.isalnum())


class Builder:
    """Collects the events of one customer as (days_ago, kind, data)."""

    def __init__(self, rng, counters):
        self.rng = rng
        self.counters = counters
        self.events = []
        self.orders = []  # (order_id, total, refunded)
        self.csat = None
        self.nps = None

    def add(self, days_ago, kind, data=None):
        days_ago = max(days_ago, 0.01)  # never in the future (15 minutes before REF at the latest)
        self.events.append((days_ago, kind, data or {}))

    def minutes(self, n):
        return n / 1440.0

    def page_views(self, d, n=1):
        for i in range(n):
            self.add(d - self.minutes(2 * i), "page_view", {"path": self.rng.choice(PAGES)})

    def ad_click(self, d):
        source, campaign = self.rng.choice(CAMPAIGNS)
        self.add(d, "ad_click", {"source": source, "campaign": campaign})
        self.add(d - self.minutes(0.2), "page_view", {"path": "/aanbiedingen"})

    def product_views(self, d, n=1):
        picks = []
        for i in range(n):
            sku, name, price = self.rng.choice(PRODUCTS)
            picks.append((sku, name, price))
            self.add(d - self.minutes(3 * i), "product_view", {"sku": sku, "name": name})
        return picks

    def search(self, d):
        self.add(d, "search", {"query": self.rng.choice(SEARCHES)})

    def compare(self, d):
        skus = self.rng.sample([p[0] for p in PRODUCTS], 2)
        self.add(d, "compare", {"skus": skus})

    def wishlist(self, d):
        self.add(d, "wishlist_add", {"sku": self.rng.choice(PRODUCTS)[0]})

    def cart(self, d, checkout=False):
        sku, name, price = self.rng.choice(PRODUCTS)
        self.add(d, "cart_add", {"sku": sku, "price": price})
        if checkout:
            self.add(d - self.minutes(4), "checkout_started", {})

    def order(self, d, delivered_after=None, refund_after=None, browse=True, big=False):
        """An order placed d days ago; delivered `delivered_after` days later (None = not yet)."""
        n_items = self.rng.choice([1, 1, 1, 2, 2, 3])
        items = [self.rng.choice(PRODUCTS) for _ in range(n_items)]
        if big and sum(p[2] for p in items) < 100:
            items.append(self.rng.choice([p for p in PRODUCTS if p[2] >= 100]))
        total = round(sum(p[2] for p in items) + (0 if sum(p[2] for p in items) >= 20 else 4.95), 2)
        self.counters["order"] += 1
        oid = str(self.counters["order"])
        if browse:
            self.add(d + self.minutes(30), "product_view", {"sku": items[0][0], "name": items[0][1]})
        self.add(d + self.minutes(12), "cart_add", {"sku": items[0][0], "price": items[0][2]})
        self.add(d + self.minutes(5), "checkout_started", {})
        self.add(d, "order_created", {"order_id": oid, "total": total})
        if delivered_after is not None and d - delivered_after > 0.01:
            self.add(d - delivered_after, "order_fulfilled", {"order_id": oid})
        refunded = False
        if refund_after is not None and d - refund_after > 0.01:
            self.add(d - refund_after, "order_refunded", {"order_id": oid, "total": total})
            refunded = True
        self.orders.append((oid, total, refunded))
        return oid

    def order_history(self, last_days_ago, n, big=False):
        """n delivered orders, the last one `last_days_ago` days ago, earlier ones spread back."""
        days = [last_days_ago]
        for _ in range(n - 1):
            days.append(min(days[-1] + self.rng.uniform(25, 120), 545))
        oids = []
        for d in sorted(set(days), reverse=True):
            oids.append(self.order(d, delivered_after=self.rng.uniform(0.8, 3.0), big=big))
        return oids

    def review(self, d, rating, order_id=None):
        data = {"rating": rating}
        if order_id:
            data["order_id"] = order_id
        self.add(d, "review_submitted", data)

    def ticket(self, opened, progress=None, resolved=None, survey=None):
        """A service ticket; progress/resolved/survey are days-ago values (or None)."""
        self.counters["ticket"] += 1
        tid = "T-%d" % self.counters["ticket"]
        self.add(opened, "ticket_opened", {"ticket_id": tid, "subject": self.rng.choice(SUBJECTS)})
        if progress is not None:
            self.add(progress, "ticket_in_progress", {"ticket_id": tid})
        if resolved is not None:
            self.add(resolved, "ticket_resolved", {"ticket_id": tid})
        if survey is not None:
            when, csat, nps = survey
            self.add(when, "survey_answered", {"ticket_id": tid, "csat": csat, "nps": nps})
            self.csat, self.nps = csat, nps


# ---------------------------------------------------------------- archetypes
# Each archetype adds events to a Builder. Comments say where they land at REF.

def a_empty(b, r):  # known contact, no events: 5K kijk, other journeys none
    pass


def a_visitor(b, r):  # one or two visits: kijk / discover / oriëntatie / awareness
    d = r.uniform(0.2, 120)
    if r.random() < 0.4:
        b.ad_click(d)
    else:
        b.page_views(d, r.choice([1, 1, 2]))


def a_engaged(b, r):  # newsletter or 3+ visits in 30 days: engage
    if r.random() < 0.5:
        b.add(r.uniform(1, 85), "newsletter_signup", {"source": r.choice(["footer", "popup", "actie"])})
        b.page_views(r.uniform(0.5, 40), r.choice([1, 2]))
    else:
        for _ in range(r.choice([3, 4, 5])):
            b.page_views(r.uniform(0.2, 29))


def a_old_visitor(b, r):  # activity long ago
    b.page_views(r.uniform(150, 500), r.choice([1, 2, 3]))
    if r.random() < 0.3:
        b.product_views(r.uniform(150, 400))


def a_browser(b, r):  # product interest in the last 14 days: kies / research / consideration
    d = r.uniform(0.1, 13.5)
    b.page_views(d + b.minutes(5))
    kind = r.random()
    if kind < 0.45:
        b.product_views(d, 1)
    elif kind < 0.8:
        b.product_views(d, r.choice([2, 3, 4]))
    else:
        b.product_views(d, 2)
        b.compare(d - b.minutes(8))


def a_searcher(b, r):  # searched in the last 7 days: trigger
    d = r.uniform(0.1, 6.5)
    b.page_views(d + b.minutes(1))
    b.search(d)


def a_wishlist(b, r):  # on the short list: activatie / evaluation
    d = r.uniform(0.2, 13)
    b.product_views(d + b.minutes(5))
    b.wishlist(d)


def a_abandoned(b, r):  # cart 4-14 days ago, no order: kies / research / activatie
    d = r.uniform(4, 13.5)
    b.product_views(d + b.minutes(5))
    b.cart(d, checkout=r.random() < 0.3)


def a_cart_now(b, r):  # cart or checkout in the last 3 days: koop / buy
    d = r.uniform(0.05, 2.8)
    b.product_views(d + b.minutes(6), r.choice([1, 2]))
    b.cart(d, checkout=r.random() < 0.5)


def a_order_open(b, r):  # order placed, not delivered yet: krijg / buy / beslissing / purchase
    if r.random() < 0.35:
        b.order_history(r.uniform(60, 300), r.choice([1, 2]))
    b.order(r.uniform(0.1, 6), delivered_after=None)


def a_delivered_recent(b, r):  # delivered 1-10 days ago: krijg/koester, experience, review request
    if r.random() < 0.4:
        b.order_history(r.uniform(60, 400), r.choice([1, 2, 3]))
    delivered = r.uniform(1.0, 10.0)
    lead = r.uniform(1.0, 3.0)
    b.order(delivered + lead, delivered_after=lead, big=r.random() < 0.5)


def a_delivered_month(b, r):  # delivered 11-30 days ago: koester / experience / ervaring
    delivered = r.uniform(11, 29)
    lead = r.uniform(1.0, 3.0)
    b.order(delivered + lead, delivered_after=lead)


def a_loyal(b, r):  # bought before, last order 31-330 days ago: koester / bond / loyalty
    n = r.choice([1, 1, 2, 2, 3, 4, 6])
    big = r.random() < 0.5
    oids = b.order_history(r.uniform(31, 330), n, big=big)
    last_d = min(e[0] for e in b.events if e[1] == "order_fulfilled")
    twist = r.random()
    if twist < 0.15:  # talked in the last 30 days: talk
        b.review(r.uniform(0.5, 29), r.choice([4, 5, 5]), oids[-1])
    elif twist < 0.3 and last_d > 35:  # talked a while ago, after the last order: back to discover
        kind = r.choice(["review_submitted", "social_share", "referral"])
        d = r.uniform(31, last_d - 1)
        if kind == "review_submitted":
            b.review(d, r.choice([4, 5]), oids[-1])
        elif kind == "social_share":
            b.add(d, "social_share", {"network": r.choice(["instagram", "facebook", "pinterest"])})
        else:
            b.add(d, "referral", {"code": "VRIEND%d" % r.randint(100, 999)})
    elif twist < 0.42:  # upsell: browsing again in the last 14 days
        b.product_views(r.uniform(0.2, 13), r.choice([1, 2, 3]))
    elif twist < 0.5:  # upsell: cart again in the last 3 days (loyalty loop)
        b.cart(r.uniform(0.05, 2.8))
    elif twist < 0.56:  # searching for something new
        b.search(r.uniform(0.1, 6))
    elif twist < 0.75:  # still reads the site and the newsletter
        b.page_views(r.uniform(0.5, 60), r.choice([1, 2]))


def a_unhappy(b, r):  # last order went wrong: refund or a 1-2 star review
    d = r.uniform(35, 150)
    if r.random() < 0.5:
        b.order(d, delivered_after=r.uniform(1, 3), refund_after=r.uniform(5, 14))
    else:
        oid = b.order(d, delivered_after=r.uniform(1, 3))
        b.review(d - r.uniform(5, 20), r.choice([1, 2]), oid)


def a_lapsed(b, r):  # last order over a year ago
    b.order_history(r.uniform(370, 520), r.choice([1, 1, 2]))
    if r.random() < 0.4:
        b.page_views(r.uniform(1, 90))


def a_influencer(b, r):  # tagged influencer / ambassadeur, no orders: bond
    b.page_views(r.uniform(1, 40), 2)
    b.add(r.uniform(35, 90), "social_share", {"network": "instagram"})


ARCHETYPES = [  # (name, function, how many)
    ("empty", a_empty, 4),
    ("visitor", a_visitor, 52),
    ("engaged", a_engaged, 26),
    ("old_visitor", a_old_visitor, 14),
    ("browser", a_browser, 38),
    ("searcher", a_searcher, 9),
    ("wishlist", a_wishlist, 8),
    ("abandoned", a_abandoned, 9),
    ("cart_now", a_cart_now, 12),
    ("order_open", a_order_open, 10),
    ("delivered_recent", a_delivered_recent, 14),
    ("delivered_month", a_delivered_month, 9),
    ("loyal", a_loyal, 58),
    ("unhappy", a_unhappy, 9),
    ("lapsed", a_lapsed, 24),
    ("influencer", a_influencer, 4),
]
assert sum(a[2] for a in ARCHETYPES) == N_CUSTOMERS


def add_service(b, r, scenario):
    """Service tickets (~15% of customers). Scenario decides the state at REF."""
    if scenario == "melding":
        b.ticket(r.uniform(0.05, 0.9))
    elif scenario == "melding_wait":
        b.ticket(r.uniform(1.2, 2.5))
    elif scenario == "behandeling":
        opened = r.uniform(0.5, 2.5)
        b.ticket(opened, progress=opened - r.uniform(0.1, 0.4))
    elif scenario == "behandeling_wait":
        opened = r.uniform(3.5, 7)
        b.ticket(opened, progress=opened - r.uniform(0.5, 1.5))
    elif scenario == "opgelost":
        resolved = r.uniform(0.3, 6)
        opened = resolved + r.uniform(1, 4)
        survey = (resolved - 0.2, r.choice([4, 5, 5]), r.choice([8, 9, 10])) if r.random() < 0.6 else None
        b.ticket(opened, progress=opened - 0.3, resolved=resolved, survey=survey)
    elif scenario == "nazorg_low":
        resolved = r.uniform(1, 20)
        opened = resolved + r.uniform(2, 8)
        b.ticket(opened, progress=opened - 0.5, resolved=resolved,
                 survey=(resolved - 0.5, r.choice([1, 2]), r.choice([0, 2, 3, 5])))
    elif scenario == "nazorg":
        resolved = r.uniform(8, 29)
        opened = resolved + r.uniform(1, 5)
        b.ticket(opened, progress=opened - 0.3, resolved=resolved,
                 survey=(resolved - 0.4, r.choice([3, 4, 5]), r.choice([7, 8, 9, 10])))
    elif scenario == "old":
        resolved = r.uniform(40, 300)
        opened = resolved + r.uniform(1, 6)
        b.ticket(opened, progress=opened - 0.5, resolved=resolved,
                 survey=(resolved - 1, r.choice([2, 3, 4, 5]), r.choice([4, 6, 7, 8, 9])))


SERVICE_SCENARIOS = (
    ["melding"] * 4 + ["melding_wait"] * 3 + ["behandeling"] * 5 + ["behandeling_wait"] * 4
    + ["opgelost"] * 8 + ["nazorg_low"] * 6 + ["nazorg"] * 6 + ["old"] * 9
)  # 45 customers = 15%


def person(r, used_emails):
    roll = r.random()
    if roll < 0.80:
        first, last, city, tz, domain = r.choice(NL_FIRST), r.choice(NL_LAST), r.choice(NL_CITIES), "Europe/Amsterdam", "example.nl"
    elif roll < 0.95:
        first, last, city, tz, domain = r.choice(BE_FIRST), r.choice(BE_LAST), r.choice(BE_CITIES), "Europe/Brussels", "example.be"
    else:
        city, tz = r.choice(OTHER_PLACES)
        first, last, domain = r.choice(NL_FIRST), r.choice(NL_LAST), "example.com"
    base = "%s.%s" % (ascii_slug(first), ascii_slug(last))
    email = "%s@%s" % (base, domain)
    n = 2
    while email in used_emails:
        email = "%s%d@%s" % (base, n, domain)
        n += 1
    used_emails.add(email)
    return first, last, city, tz, email


def build_customers():
    r = random.Random(SEED)
    counters = {"order": 100000, "ticket": 5000}
    plan = [(name, fn) for name, fn, count in ARCHETYPES for _ in range(count)]
    r.shuffle(plan)

    # Service tickets go mostly to customers who bought something.
    buyer_like = [i for i, (name, _) in enumerate(plan) if name in
                  ("order_open", "delivered_recent", "delivered_month", "loyal", "unhappy", "lapsed")]
    others = [i for i, (name, _) in enumerate(plan) if name not in ("empty",) and i not in buyer_like]
    ticket_idx = r.sample(buyer_like, 36) + r.sample(others, 9)
    scenarios = list(SERVICE_SCENARIOS)
    r.shuffle(scenarios)
    service_of = dict(zip(ticket_idx, scenarios))

    used_emails = set()
    customers = []
    for i, (arch, fn) in enumerate(plan):
        b = Builder(r, counters)
        fn(b, r)
        if i in service_of:
            add_service(b, r, service_of[i])
        first, last, city, tz, email = person(r, used_emails)

        tags = []
        consent = r.random() < 0.7 or any(e[1] == "newsletter_signup" for e in b.events)
        if consent:
            tags.append("nieuwsbrief")
        spent = float(round(sum(t for _, t, refunded in b.orders if not refunded), 2))
        if spent >= 300:
            tags.append("vip")
        if arch == "influencer":
            tags.append(r.choice(["influencer", "ambassadeur"]))
        if r.random() < 0.15:
            tags.append(r.choice(["koffie", "keuken", "tuin", "fietsen", "sport"]))
        if r.random() < 0.05:
            tags.append("b2b")

        b.events.sort(key=lambda e: -e[0])  # oldest first
        oldest = b.events[0][0] if b.events else r.uniform(10, 540)
        created = REF - timedelta(days=min(oldest + r.uniform(0, 30), 560))
        events = []
        for days_ago, kind, data in b.events:
            ev = {"kind": kind, "at": iso(REF - timedelta(days=days_ago))}
            if data:
                ev["data"] = data
            events.append(ev)

        c = {
            "id": "c%04d" % (i + 1),
            "email": email,
            "first_name": first,
            "last_name": last,
            "city": city,
            "timezone": tz,
            "consent_email": consent,
            "tags": tags,
            "orders_count": len(b.orders),
            "total_spent": spent,
            "created_at": iso(created),
        }
        if b.csat is not None:
            c["csat"] = b.csat
        if b.nps is not None:
            c["nps"] = b.nps
        c["events"] = events
        customers.append(c)
    return customers


def build_csv_rows():
    """20 customers, attributes only, as they might come out of a webshop export."""
    r = random.Random(SEED + 1)
    used = set()
    rows = []
    for i in range(20):
        first, last, city, tz, email = person(r, used)
        orders = r.choice([0, 0, 0, 1, 1, 2, 3, 5])
        spent = float(round(sum(r.choice(PRODUCTS)[2] for _ in range(orders)), 2))
        tags = []
        if r.random() < 0.6:
            tags.append("nieuwsbrief")
        if spent >= 300:
            tags.append("vip")
        if r.random() < 0.2:
            tags.append(r.choice(["koffie", "keuken", "tuin"]))
        csat = r.choice(["", "", "", 2, 4, 5])
        nps = r.choice(["", "", "", 3, 8, 10])
        created = REF - timedelta(days=r.uniform(30, 540))
        rows.append({
            "id": "csv%03d" % (i + 1),
            "email": email,
            "first_name": first,
            "last_name": last,
            "city": city,
            "timezone": tz,
            "consent_email": "true" if "nieuwsbrief" in tags else "false",
            "tags": ",".join(tags),
            "orders_count": orders,
            "total_spent": spent,
            "csat": csat,
            "nps": nps,
            "created_at": iso(created),
        })
    return rows


def main():
    customers = build_customers()
    with open(os.path.join(HERE, "customers.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for c in customers:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    rows = build_csv_rows()
    with open(os.path.join(HERE, "customers.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    n_events = sum(len(c["events"]) for c in customers)
    print("wrote %d customers (%d events) to customers.jsonl and %d rows to customers.csv"
          % (len(customers), n_events, len(rows)))


if __name__ == "__main__":
    main()
