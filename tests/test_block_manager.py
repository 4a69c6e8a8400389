import pytest

from splitserve.engine.block_manager import BlockManager, OutOfBlocks, blocks_for


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]


def test_allocate_hands_out_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("b", 4) == [2]
    assert bm.num_free_blocks == 5
    assert bm.block_table("a") == [0, 1]


def test_free_returns_blocks_fifo_and_reuses_them():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 8)  # 0, 1
    bm.allocate("b", 4)  # 2
    assert bm.free("a") == [0, 1]
    assert bm.allocate("c", 12) == [3, 0, 1]
    assert bm.num_free_blocks == 0


def test_grow_adds_a_block_only_at_the_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 3)
    assert bm.grow("a", 4) == []
    assert bm.grow("a", 5) == [1]
    assert bm.block_table("a") == [0, 1]


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 4)
    with pytest.raises(OutOfBlocks):
        bm.allocate("b", 9)
    assert not bm.owns("b")
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(5)
    assert bm.can_allocate(4)


def test_double_allocate_is_refused_and_unknown_free_is_harmless():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 1)
    with pytest.raises(ValueError):
        bm.allocate("a", 1)
    assert bm.free("nobody") == []
    assert bm.usage == 0.5
