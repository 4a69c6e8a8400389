from splitserve.engine.block_manager import BlockManager
from splitserve.engine.request import RequestState, SamplingParams, Sequence
from splitserve.engine.scheduler import Scheduler, SchedulerConfig


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams())


def make(num_blocks=16, block_size=4, budget=10, max_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs), BlockManager(num_blocks, block_size))


def test_prefill_is_fcfs_within_token_budget():
    s = make(budget=10)
    for rid, n in [("a", 4), ("b", 5), ("c", 3)]:
        s.add(seq(rid, n))
    batch = s.schedule_prefill()
    assert [x.request_id for x in batch] == ["a", "b"]  # c would make 12 > 10
    assert [x.request_id for x in s.waiting] == ["c"]
    assert s.blocks.block_table("a") == [0] and s.blocks.block_table("b") == [7, 8]  # room for a to grow
    assert all(x.state is RequestState.PREFILLING for x in batch)


def test_a_prompt_longer_than_the_budget_runs_alone():
    s = make(budget=10)
    s.add(seq("long", 20))
    s.add(seq("short", 2))
    assert [x.request_id for x in s.schedule_prefill()] == ["long"]
    assert [x.request_id for x in s.schedule_prefill()] == ["short"]


def test_head_of_line_waits_for_blocks_without_being_overtaken():
    s = make(num_blocks=3, block_size=4, budget=100)
    s.add(seq("big", 16))  # needs 4 blocks, only 3 exist free
    s.add(seq("small", 2))
    assert s.schedule_prefill() == []
    assert [x.request_id for x in s.waiting] == ["big", "small"]


def test_max_num_seqs_caps_running_plus_new():
    s = make(budget=100, max_seqs=2)
    for rid in "abc":
        s.add(seq(rid, 2))
    assert len(s.schedule_prefill()) == 2


def test_decode_grows_tables_and_preempts_the_newest_when_out_of_blocks():
    s = make(num_blocks=3, block_size=4, budget=100)
    a, b = seq("a", 4), seq("b", 4)
    for x in (a, b):
        s.add(x)
    s.schedule_prefill()
    for x in (a, b):
        x.output_token_ids.append(9)  # each now needs a 2nd block; only 1 is free
        s.running.append(x)
    batch, preempted = s.schedule_decode()
    assert [x.request_id for x in batch] == ["a"]
    assert [x.request_id for x in preempted] == ["b"]
    assert s.blocks.block_table("a") == [0, 2]
    assert not s.blocks.owns("b")
    assert b.state is RequestState.QUEUED and s.waiting[0] is b


def test_decode_batch_is_a_copy_of_running():
    s = make()
    a = seq("a", 2)
    s.add(a)
    s.schedule_prefill()
    s.running.append(a)
    batch, _ = s.schedule_decode()
    s.running.remove(a)
    assert batch == [a]


def test_remove_frees_blocks_wherever_the_sequence_is():
    s = make()
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.schedule_prefill()
    s.running.append(a)
    s.add(b)
    s.remove(a)
    s.remove(b)
    assert not s.has_work
    assert s.blocks.num_free_blocks == 16


def make_chunked(chunk_size: int, num_blocks=16, block_size=4, max_seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(100, max_seqs, chunk_size), BlockManager(num_blocks, block_size))


def test_a_mixed_step_puts_decodes_first_and_fills_the_chunk_with_prompts_in_order():
    s = make_chunked(chunk_size=8)
    running = seq("run", 3)
    s.blocks.allocate("run", 3)
    running.transition(RequestState.DECODING)
    s.running.append(running)
    s.add(seq("a", 5))
    s.add(seq("b", 9))
    decodes, chunks, preempted = s.schedule_mixed()
    assert decodes == [running] and preempted == []
    assert [(x.request_id, n) for x, n in chunks] == [("a", 5), ("b", 2)]  # 1 decode + 7 prompt tokens
    assert [x.request_id for x in s.prefilling] == ["a", "b"] and not s.waiting
    assert len(s.blocks.block_table("b")) == 3  # the whole 9-token prompt's blocks, at its first chunk


def test_a_prompt_part_way_through_goes_before_new_ones():
    s = make_chunked(chunk_size=4)
    s.add(seq("a", 10))
    s.add(seq("b", 2))
    (_, [(a, n)], _) = s.schedule_mixed()
    assert (a.request_id, n) == ("a", 4)
    a.num_computed_tokens += n  # the engine's bookkeeping after the pass
    _, chunks, _ = s.schedule_mixed()
    assert [(x.request_id, n) for x, n in chunks] == [("a", 4)]
    a.num_computed_tokens += 4
    _, chunks, _ = s.schedule_mixed()
    assert [(x.request_id, n) for x, n in chunks] == [("a", 2), ("b", 2)]


def test_remove_takes_a_sequence_out_of_prefill_mid_way():
    s = make_chunked(chunk_size=4)
    s.add(seq("a", 10))
    s.schedule_mixed()
    s.remove(s.prefilling[0])
    assert not s.prefilling and not s.has_work
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_a_decode_out_of_blocks_is_preempted_while_a_prompt_part_way_through_keeps_its_blocks():
    s = make_chunked(chunk_size=4, num_blocks=4, block_size=4)
    running = seq("run", 4)  # its next token needs a second block
    s.blocks.allocate("run", 4)
    running.num_computed_tokens = 4
    running.transition(RequestState.DECODING)
    s.running.append(running)
    s.add(seq("long", 12))  # takes the other 3 blocks at its first chunk
    decodes, chunks, _ = s.schedule_mixed()
    assert decodes == [running] and [(x.request_id, n) for x, n in chunks] == [("long", 3)]
    chunks[0][0].num_computed_tokens += 3
    running.output_token_ids.append(7)  # the decode step's token: 5 tokens now, 2 blocks needed
    decodes, chunks, preempted = s.schedule_mixed()
    assert decodes == [] and preempted == [running]
    assert running.state is RequestState.QUEUED and running.num_computed_tokens == 0
    assert list(s.waiting) == [running] and [x.request_id for x in s.prefilling] == ["long"]
    assert [(x.request_id, n) for x, n in chunks] == [("long", 4)]  # the prompt goes on with its blocks
    assert len(s.blocks.block_table("long")) == 3
