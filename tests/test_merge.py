"""Merging search results from several archives: de-duplication, order, paging; number text is kept."""

from proxy.federation.merge import dumps, loads, merge, order, page


def study(uid, date="", time="", mods=(), n_series=None, n_inst=None, desc=None):
    r = {"0020000D": {"vr": "UI", "Value": [uid]}}
    if date:
        r["00080020"] = {"vr": "DA", "Value": [date]}
    if time:
        r["00080030"] = {"vr": "TM", "Value": [time]}
    if mods:
        r["00080061"] = {"vr": "CS", "Value": list(mods)}
    if n_series is not None:
        r["00201206"] = {"vr": "IS", "Value": [n_series]}
    if n_inst is not None:
        r["00201208"] = {"vr": "IS", "Value": [n_inst]}
    if desc is not None:
        r["00081030"] = {"vr": "LO", "Value": [desc]} if desc else {"vr": "LO"}
    return r


def test_number_text_survives_a_round_trip():
    body = (b'[{"00281053":{"vr":"DS","Value":[1.50,1E2,-0.0]},'
            b'"00100010":{"vr":"PN","Value":[{"Alphabetic":"M\xc3\xbc"}]}}]')
    assert dumps(loads(body)) == body


def test_duplicates_merge_with_the_documented_policy():
    a = [study("1.1", "20240101", mods=["CT"], n_series=1, n_inst=4, desc="")]
    b = [study("1.1", "20240101", mods=["MR", "CT"], n_series=2, n_inst=3, desc="from B"), study("1.2", "20230101")]
    merged, where = merge([("a", a), ("b", b)], "study")
    assert len(merged) == 2
    s = next(r for r in merged if r["0020000D"]["Value"] == ["1.1"])
    assert s["00080061"]["Value"] == ["CT", "MR"]          # union
    assert [str(v) for v in s["00201206"]["Value"]] == ["2"]  # largest count
    assert [str(v) for v in s["00201208"]["Value"]] == ["4"]
    assert s["00081030"]["Value"] == ["from B"]            # primary had it empty
    assert where == {"1.1": ["a", "b"], "1.2": ["b"]}


def test_order_is_newest_first_then_uid_and_stable_under_input_order():
    recs = [study("9", "20230101"), study("2", "20240101", "0800"), study("1", "20240101", "0900"),
            study("3", "20240101", "0800"), study("0")]
    expected = ["1", "2", "3", "9", "0"]
    assert [r["0020000D"]["Value"][0] for r in order(recs, "study")] == expected
    assert [r["0020000D"]["Value"][0] for r in order(list(reversed(recs)), "study")] == expected


def test_paging_walks_every_record_once():
    recs = [study(str(i), f"2024{i:04d}") for i in range(1, 24)]
    ordered = order(recs, "study")
    seen, offset = [], 0
    while True:
        chunk, remaining = page(ordered, offset, 5)
        if not chunk:
            break
        seen += chunk
        offset += len(chunk)
        assert remaining == len(recs) - offset
    assert seen == ordered
    assert page(ordered, 0, None) == (ordered, 0)
    assert page(ordered, 100, 5) == ([], 0)
