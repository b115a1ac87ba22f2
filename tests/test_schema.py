"""The feature schema in one process: YAML errors, the Criteo preset, the schema CSV reader
against pandas, the schema synthetic data against its documented laws, key hashing against the
documented formula, and the model contract's start-up checks (wrong input, wrong shape).
"""
import hashlib
import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hybridps.config import make_config  # noqa: E402
from hybridps.errors import ConfigError, DataError  # noqa: E402
from hybridps.schema import build_schema  # noqa: E402
from tests.reference import mix64_int  # noqa: E402

FEATURES = {
    "label": "label", "group_by": "user",
    "dense": [{"name": "hour"}, {"name": "user_activity", "transform": "log1p"}],
    "sparse": [{"name": "user", "table": "user"},
               {"name": "movie", "table": "movie"},
               {"name": "genres", "table": "genre", "pooling": "mean", "separator": "|"},
               {"name": "history", "table": "movie", "pooling": "none", "max_len": 3}],
    "tables": {"user": {"dim": 16}, "movie": {"dim": 32, "optimizer": "sgd", "learning_rate": 0.5},
               "genre": {"dim": 8, "min_count": 2}},
}


def schema_of(features, **overrides):
    return build_schema(make_config(overrides=dict(features=features, **overrides)))


def with_sparse(change):
    features = {**FEATURES, "sparse": [dict(f) for f in FEATURES["sparse"]], "tables": dict(FEATURES["tables"])}
    change(features)
    return features


# ---------------------------------------------------------------- the schema
def test_a_schema_from_yaml_with_per_table_settings(tmp_path):
    path = tmp_path / "c.yaml"
    import yaml
    path.write_text(yaml.safe_dump({"features": FEATURES, "dim": 4, "optimizer": "adagrad"}, sort_keys=False))
    schema = build_schema(make_config(str(path)))
    assert [t.name for t in schema.tables] == ["user", "movie", "genre"]
    user, movie, genre = schema.tables
    assert (user.dim, user.optimizer, user.learning_rate) == (16, "adagrad", 0.05)   # global defaults
    assert (movie.dim, movie.optimizer, movie.learning_rate) == (32, "sgd", 0.5)
    assert genre.min_count == 2 and genre.policy()["min_count"] == 2
    assert [f.kind for f in schema.sparse] == ["single", "single", "pooled", "sequence"]
    assert schema.feature("history").key_space == "movie" == schema.feature("movie").key_space
    assert [f.name for f in schema.single_features] == ["user", "movie"]
    from hybridps.schema import schema_from_dict
    assert schema_from_dict(schema.to_dict()) == schema


@pytest.mark.parametrize("change, message", [
    (lambda f: f["sparse"][0].update(table="users"), r"features.sparse.user.table: 'users' is not a table"),
    (lambda f: f["sparse"][2].update(pooling="max"), r"features.sparse.genres.pooling: 'max' is not one of sum, mean, sqrtn, none"),
    (lambda f: f["sparse"][3].pop("max_len"), r"features.sparse.history: a sequence \(pooling: none\) needs max_len"),
    (lambda f: f["sparse"].append({"name": "user", "table": "user"}), r"the name 'user' is used by more than one feature"),
    (lambda f: f["tables"].update(genre={"dim": 0}), r"'features.tables.genre.dim': 0 is invalid"),
    (lambda f: f["tables"].update(genre={"dimm": 8}), r"features.tables.genre: unknown key\(s\) \['dimm'\]"),
    (lambda f: f["tables"].update(genre={"dim": 10 ** 9}), r"'features.tables.genre.dim': 1000000000 is invalid; allowed: an integer from 1 to 4096"),
    (lambda f: f["sparse"][3].update(max_len=10 ** 9), r"features.sparse.history.max_len: 1000000000 is invalid; allowed: an integer from 1 to 10000"),
    (lambda f: f["sparse"][0].update(max_len=3), r"features.sparse.user.max_len: only list features"),
    (lambda f: f["sparse"][0].update(name="dense"), r"'dense' is reserved"),
    (lambda f: f["tables"].update(unused={"dim": 4}), r"table\(s\) \['unused'\] are read by no sparse feature"),
    (lambda f: f["sparse"].append({"name": "history_length", "table": "user"}), r"history_length"),
])
def test_schema_errors_name_the_feature_table_or_field(change, message):
    with pytest.raises(ConfigError, match=message):
        schema_of(with_sparse(change))


def test_old_table_keys_with_a_schema_say_what_to_write_instead():
    with pytest.raises(ConfigError, match=r"'table_settings' .* features.tables.<name>"):
        schema_of(FEATURES, table_settings={0: {"min_count": 2}})


def test_the_criteo_preset_keeps_todays_layouts_and_keys():
    from hybridps.schema import criteo_preset
    config = make_config(overrides={"table_groups": [[0, 2], [1]], "num_fields": 3})
    schema = criteo_preset(config, 3, 2)
    assert schema.preset == "criteo" and schema.field_groups == ((0, 2), (1,))
    assert [f.table for f in schema.sparse] == ["group0", "group1", "group0"]
    assert [f.key_space for f in schema.sparse] == ["0", "1", "2"]        # one per field, as today
    shared = criteo_preset(make_config(), 26, 13)
    assert len(shared.tables) == 1 and len(shared.sparse) == 26 and shared.num_dense == 13


def test_the_global_dim_and_the_presets_field_counts_have_upper_bounds():
    with pytest.raises(ConfigError, match=r"'dim' \(the run's setting, which table 'criteo' takes\): 1000000000 is invalid; allowed: an integer from 1 to 4096"):
        build_schema(make_config(overrides={"dim": 10 ** 9}))
    with pytest.raises(ConfigError, match=r"'dim' \(the run's setting, which table 'user' takes\): 5000 is invalid"):
        schema_of({**FEATURES, "tables": dict(FEATURES["tables"], user={})}, dim=5000)  # no own dim
    with pytest.raises(ConfigError, match=r"'num_fields': 1000000000 is invalid; allowed: an integer from 1 to 10000"):
        build_schema(make_config(overrides={"num_fields": 10 ** 9}))
    assert build_schema(make_config(overrides={"dim": 4096})).dims == (4096,)


def test_deepfm_refuses_mixed_dims_and_din_needs_a_sequence_with_its_candidate():
    from hybridps.models import build_model
    config = make_config(overrides={"features": FEATURES})
    with pytest.raises(ConfigError, match=r"deepfm needs every sparse feature at one dim"):
        build_model("deepfm", build_schema(config), config)
    no_candidate = with_sparse(lambda f: f["sparse"].pop(1))           # drop 'movie'
    c2 = make_config(overrides={"features": no_candidate})
    with pytest.raises(ConfigError, match=r"din attends over the sequence 'history' .* table \('movie'\)"):
        build_model("din", build_schema(c2), c2)


# ---------------------------------------------------------------- user models
def test_a_model_that_reads_a_missing_input_or_returns_another_shape_fails_at_start(tmp_path):
    import tensorflow as tf
    from hybridps.models import load_build_function
    from hybridps.step import build_on_sample
    schema = schema_of(FEATURES)
    source = tmp_path / "bad_models.py"
    source.write_text(
        "import tensorflow as tf\n"
        "class Reads(tf.keras.Model):\n"
        "    def __init__(self):\n        super().__init__(); self.d = tf.keras.layers.Dense(1)\n"
        "    def call(self, inputs, training=False):\n        return self.d(inputs['age'])\n"
        "class Shape(tf.keras.Model):\n"
        "    def __init__(self):\n        super().__init__(); self.d = tf.keras.layers.Dense(3)\n"
        "    def call(self, inputs, training=False):\n        return self.d(inputs['user'])\n"
        "def reads(schema, config):\n    return Reads()\n"
        "def shape(schema, config):\n    return Shape()\n")
    config = make_config()
    with pytest.raises(ConfigError, match=r"the model reads the input 'age', which the schema does not "
                                          r"provide; its inputs are \['dense', 'genres', 'history', "
                                          r"'history_length', 'movie', 'user'\]"):
        build_on_sample(tf, load_build_function(f"{source}:reads")(schema, config), schema)
    with pytest.raises(ConfigError, match=r"the model returns shape \(2, 3\) for a batch of 2"):
        build_on_sample(tf, load_build_function(f"{source}:shape")(schema, config), schema)
    with pytest.raises(ConfigError, match=r"has no function 'nope'"):
        load_build_function(f"{source}:nope")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_build_function(f"{tmp_path}/missing.py:build")
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_module'"):
        load_build_function("no_such_module:build")


# ---------------------------------------------------------------- keys
def reference_space_key(space, ident):
    seed = int.from_bytes(hashlib.blake2b(space.encode(), digest_size=8, person=b"hybridps-space-1").digest(), "little")
    key = mix64_int(mix64_int(ident + 0x9E3779B97F4A7C15) ^ seed)
    return key - (1 << 64) if key >= 1 << 63 else key


def test_schema_keys_follow_the_documented_formula_and_ints_hash_by_their_decimal_text():
    from hybridps.data.hashing import space_keys, text_ids
    ids = text_ids(["42", "-7", "0", "007", "+5", "Drama", "", None, 42])
    assert ids[:3].tolist() == [42, -7, 0] and ids[8] == 42 and ids[6] == ids[7] == -1
    for j in (3, 4, 5):            # not canonical decimal text: hashed as text
        text = ["007", "+5", "Drama"][j - 3]
        digest = hashlib.blake2b(text.encode(), digest_size=8, person=b"hybridps-value-1").digest()
        assert ids[j] == int.from_bytes(digest, "little", signed=True)
    keys = space_keys("movie", ids)
    assert keys.tolist() == [reference_space_key("movie", int(i)) for i in ids]
    assert space_keys("genre", [42])[0] != space_keys("movie", [42])[0]     # key spaces apart


# ---------------------------------------------------------------- the CSV reader
def write_csv(path, rows):
    path.write_text("label,user,movie,genres,history,hour,user_activity,unused\n"
                    + "\n".join(rows) + "\n")
    return str(path)


def test_schema_csv_reader_against_pandas(tmp_path):
    import pandas as pd
    from hybridps.data.hashing import space_keys, text_ids
    from hybridps.data.schema_csv import SchemaCSVReader
    rng = np.random.default_rng(0)
    rows = []
    for i in range(50):
        genres = "|".join(rng.choice(["Drama", "Comedy", "Horror"], size=rng.integers(0, 4)))
        history = "|".join(str(x) for x in rng.integers(0, 99, size=rng.integers(0, 6)))
        hour = "" if i % 7 == 0 else f"{rng.random() * 24:.2f}"
        rows.append(f"{i % 2},u{rng.integers(0, 9)},{rng.integers(0, 50)},{genres},{history},{hour},"
                    f"{rng.integers(0, 9)},x")
    path = write_csv(tmp_path / "m.csv", rows)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    schema = schema_of(FEATURES)
    for rank in (0, 1):
        reader = SchemaCSVReader(path, schema, rank=rank, world_size=2)
        mine = frame.iloc[rank::2]
        share = reader.share
        np.testing.assert_array_equal(share.labels, mine["label"].astype(np.float32))
        np.testing.assert_allclose(share.dense[:, 0], pd.to_numeric(mine["hour"].replace("", "0")), rtol=1e-6)
        np.testing.assert_allclose(share.dense[:, 1], np.log1p(mine["user_activity"].astype(float)), rtol=1e-6)
        np.testing.assert_array_equal(share.keys[:, 0], space_keys("user", text_ids(mine["user"])))
        np.testing.assert_array_equal(share.keys[:, 1], space_keys("movie", text_ids(mine["movie"])))
        for name, space, cap in (("genres", "genre", None), ("history", "movie", 3)):
            lists = [[v for v in c.split("|") if v][:cap] for c in mine[name]]
            values, lengths = share.lists[name]
            assert lengths.tolist() == [len(x) for x in lists]
            np.testing.assert_array_equal(values, space_keys(space, text_ids([v for x in lists for v in x])))
        np.testing.assert_array_equal(share.groups, text_ids(mine["user"]))


def test_schema_csv_reader_bad_input_names_file_line_and_column(tmp_path):
    from hybridps.data.schema_csv import SchemaCSVReader
    schema = schema_of(FEATURES)
    good = "1,u1,3,Drama,1|2,5,1,x"
    bad = write_csv(tmp_path / "bad.csv", [good, "1,u1,3,Drama,1|2,oops,1,x", good, "2,u1,3,,,1,1,x",
                                           "1,u2,4"])
    # data lines 0..4 are file lines 2..6: rank 0 owns lines 2, 4, 6; rank 1 lines 3, 5
    with pytest.raises(DataError, match=r"bad.csv, line 6: expected 8 columns, found 3"):
        SchemaCSVReader(bad, schema, rank=0, world_size=2)
    with pytest.raises(DataError, match=r"bad.csv, line 5, column 'label': the label must be 0 or 1: '2'"):
        SchemaCSVReader(bad, schema, rank=1, world_size=2)
    with pytest.raises(DataError, match=r"bad2.csv, line 3, column 'hour': dense feature 'hour' is not a number: 'oops'"):
        SchemaCSVReader(write_csv(tmp_path / "bad2.csv", [good, "1,u1,3,Drama,1|2,oops,1,x"]), schema,
                        rank=1, world_size=2)
    skipping = SchemaCSVReader(bad, schema, rank=0, world_size=1, on_bad_line="skip")
    assert skipping.num_rows == 2 and skipping.bad_lines == 3
    assert any("line 6: expected 8 columns, found 3" in e for e in skipping.bad_line_examples)
    missing = tmp_path / "missing.csv"
    missing.write_text("label,user,movie\n1,2,3\n")
    with pytest.raises(DataError, match=r"missing.csv: column\(s\) \['hour', 'user_activity', 'genres', 'history'\] missing"):
        SchemaCSVReader(str(missing), schema)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + open(write_csv(tmp_path / "plain.csv", [good]), "rb").read())
    assert SchemaCSVReader(str(bom), schema).num_rows == 1


def test_schema_csv_damaged_lines_are_named_and_under_skip_only_they_are_skipped(tmp_path):
    import pandas as pd
    from hybridps.data.files import MAX_LINE_BYTES
    from hybridps.data.schema_csv import SchemaCSVReader
    schema = schema_of(FEATURES)
    good = [f"{i % 2},u{i},{i},Drama,1|2,{i}.5,1,x" for i in range(8)]
    lines = [line.encode() for line in good]
    lines[2] = b"1,u\xff\xfe,2,Drama,1|2,2.5,1,x"           # file line 4: not UTF-8
    lines[5] = b"0,u5,5,Drama," + b"7|" * (MAX_LINE_BYTES // 2 + 1) + b"7,5.5,1,x"   # file line 7: too long
    lines[6] = b"1,u6,6,Drama,1|2,1e300,1,x"                   # file line 8: beyond float32
    path = tmp_path / "d.csv"
    path.write_bytes(b"label,user,movie,genres,history,hour,user_activity,unused\n" + b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"d.csv, line 4: not valid UTF-8 text"):
        SchemaCSVReader(str(path), schema)
    with pytest.raises(DataError, match=rf"d.csv, line 7: the line is {len(lines[5])} bytes long"):
        SchemaCSVReader(str(path), schema, rank=1, world_size=2)     # data line 5 is rank 1's
    huge = write_csv(tmp_path / "f.csv", good[:3] + [lines[6].decode()])
    with pytest.raises(DataError, match=r"f.csv, line 5: .*column 'hour' .*float32.*1e\+300"):
        SchemaCSVReader(huge, schema)
    skipping = SchemaCSVReader(str(path), schema, on_bad_line="skip")
    assert skipping.bad_lines == 3 and skipping.data_lines == 8
    kept = [0, 1, 3, 4, 7]                                      # data lines, independently
    assert skipping.share.row_ids.tolist() == kept
    frame = pd.read_csv(io.StringIO("label,user,movie,genres,history,hour,user_activity,unused\n"
                                    + "\n".join(good[i] for i in kept)), dtype=str)
    np.testing.assert_allclose(skipping.share.dense[:, 0], frame["hour"].astype(float), rtol=1e-6)
    # the ranks still number the lines alike: line i is rank i % 2's
    shares = [SchemaCSVReader(str(path), schema, rank=r, world_size=2, on_bad_line="skip") for r in (0, 1)]
    assert [s.share.row_ids.tolist() for s in shares] == [[0, 4], [1, 3, 7]]


def test_criteo_non_utf8_or_overlong_line_is_skipped_alone_and_a_huge_count_is_read(tmp_path):
    from hybridps.data.criteo import CriteoReader
    from hybridps.data.files import MAX_LINE_BYTES
    line = lambda i, first="1": "\t".join([str(i % 2), first] + ["2"] * 12 + [f"a{i}"] * 26)  # noqa: E731
    lines = [line(i).encode() for i in range(5)]
    lines[1] = lines[1].replace(b"a1", b"a\xff", 1)            # file line 2: not UTF-8
    lines[3] = line(3, first="1e300").encode()                # a count of 1e300: log1p is finite
    lines.append(line(5).replace("a5", "b" * MAX_LINE_BYTES, 1).encode())   # line 6: too long
    path = tmp_path / "c.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"c.tsv, line 2: not valid UTF-8 text"):
        CriteoReader(str(path))
    long = tmp_path / "long.tsv"
    long.write_bytes(lines[0] + b"\n" + lines[5] + b"\n")
    with pytest.raises(DataError, match=rf"long.tsv, line 2: the line is {len(lines[5])} characters long"):
        CriteoReader(str(long))
    reader = CriteoReader(str(path), on_bad_line="skip")
    assert reader.bad_lines == 2 and reader.share.row_ids.tolist() == [0, 2, 3, 4]
    assert "line 2" in reader.bad_line_examples[0] and "line 6" in reader.bad_line_examples[1]
    np.testing.assert_allclose(reader.dense[2, 0], np.log1p(1e300), rtol=1e-6)   # 690.8


# ---------------------------------------------------------------- synthetic data of a schema
def test_schema_synthetic_data_follows_its_documented_laws():
    from hybridps.data.hashing import space_keys
    from hybridps.data.synthetic_schema import SchemaSynthetic, length_exponent
    schema = schema_of(FEATURES)
    data = SchemaSynthetic(schema, list_mean_length=4.0, vocab_size=1000, seed=5)
    singles, lists, dense, labels = data.raw_batch(3, 20000)
    batch = data.batch(3, 20000)
    np.testing.assert_array_equal(batch.keys[:, 1], space_keys("movie", singles[:, 1]))
    ids, lengths = lists["history"]                             # raw: before truncation
    from hybridps.data.batch import truncate_lists
    kept, kept_lengths, dropped = truncate_lists(ids, lengths, 3)
    assert batch.lists["history"][1].max() == 3 and batch.truncated["history"] == dropped > 0
    np.testing.assert_array_equal(batch.lists["history"][0], space_keys("movie", kept))
    genre_lengths = lists["genres"][1]
    assert genre_lengths.max() <= 50 and abs(genre_lengths.mean() - 4.0) < 0.15
    a = length_exponent(4.0, 50)
    k = np.arange(51)
    p = (k + 1.0) ** -a
    assert abs((p * k).sum() / p.sum() - 4.0) < 1e-6            # the solved exponent gives the mean
    assert (genre_lengths == 0).any()                           # empty lists occur
    np.testing.assert_array_equal(batch.labels, labels)
    assert abs(labels.mean() - 0.25) < 0.02                    # target_ctr
    assert data.bayes_auc(20000) > 0.65                         # the pooled values carry signal
    again = SchemaSynthetic(schema, list_mean_length=4.0, vocab_size=1000, seed=5).batch(3, 20000)
    np.testing.assert_array_equal(again.keys, batch.keys)
