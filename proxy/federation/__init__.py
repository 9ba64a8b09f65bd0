"""Several archives as one: where a study is, merging searches, the search cache."""
