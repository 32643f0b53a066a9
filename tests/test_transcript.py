"""The transcript: commits in any order read as position-ordered tokens, a gap-free prefix, EOS cuts."""

from refusion_mlx.transcript import Commit, Transcript

EOS = 9


def commit(positions, tokens):
    return Commit(list(positions), list(tokens), "verify", 1, 1.0)


def test_out_of_order_commits_read_in_position_order_with_a_growing_prefix():
    t = Transcript([EOS], limit=8)
    assert t.add(commit([4, 5], [14, 15])) == [4, 5]
    assert t.prefix() == [] and t.tokens() == [14, 15] and not t.ended
    t.add(commit([0, 1], [10, 11]))
    assert t.prefix() == [10, 11] and t.prefix_length == 2
    t.add(commit([2, 3], [12, 13]))
    assert t.prefix() == [10, 11, 12, 13, 14, 15] and t.tokens() == t.prefix()


def test_padding_past_the_limit_is_never_placed_and_the_limit_ends_it():
    t = Transcript([EOS], limit=3)
    assert t.add(commit([0, 1, 2, 3], [1, 2, 3, 4])) == [0, 1, 2]
    assert t.tokens() == [1, 2, 3] and t.ended


def test_the_first_eos_cuts_tokens_text_and_ends_the_generation():
    t = Transcript([EOS], limit=16)
    t.add(commit([3, 4, 5], [EOS, 7, 7]))  # an EOS already committed, before the prefix reaches it
    assert not t.ended
    t.add(commit([0, 1, 2], [1, 2, 3]))
    assert t.ended
    assert t.tokens() == [1, 2, 3, EOS] and t.tokens(with_eos=False) == [1, 2, 3]
    assert t.prefix() == [1, 2, 3] and t.prefix(with_eos=True) == [1, 2, 3, EOS]
    result = t.result(model_calls=4, tokens_fed=20, wall_time=1.0, cached_tokens=5)
    assert result.tokens == [1, 2, 3, EOS] and result.iterations == 2 and result.cached_tokens == 5
    assert result.tokens_per_call == 1.0
