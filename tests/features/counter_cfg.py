"""The counter configuration the online-store tests share: user, item, genre and
user × genre counters with 1 h and 1 day half-lives."""

from features.counters import CounterConfig, CounterSpec

CFG = CounterConfig(
    specs=(
        CounterSpec("user", key=("user_id",)),
        CounterSpec("item", key=("item_id",)),
        CounterSpec("genre", key=("genre",)),
        CounterSpec("user_genre", key=("user_id", "genre")),
    ),
    half_lives=(3600.0, 86400.0),
)
