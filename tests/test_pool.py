"""The expert grid: ids are a bijection onto grid cells and never move when the grid grows."""
import pytest
import torch

from peer_model.pool import ExpertGrid, Segment


def brute_force_numbering(shapes: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """Independent reference: walk each growth stage and number its new cells as pool.py documents."""
    ids: dict[tuple[int, int], int] = {}
    prev_rows = prev_cols = 0
    for rows, cols in shapes:
        for i in range(prev_rows):  # new columns of the old rows first
            for j in range(prev_cols, cols):
                ids[(i, j)] = len(ids)
        for i in range(prev_rows, rows):  # then the new rows in full
            for j in range(cols):
                ids[(i, j)] = len(ids)
        prev_rows, prev_cols = rows, cols
    return ids


@pytest.mark.parametrize("shapes", [
    [(4, 4)],
    [(4, 4), (5, 5)],
    [(3, 3), (3, 5), (6, 5), (6, 6), (9, 7)],
    [(2, 7), (8, 7)],
])
def test_cell_ids_match_reference_numbering(shapes):
    grid = ExpertGrid.square(shapes[0][0]) if shapes[0][0] == shapes[0][1] else ExpertGrid(
        [Segment(0, shapes[0][0] * shapes[0][1], *shapes[0])])
    for rows, cols in shapes[1:]:
        grid.grow(rows, cols)
    expected = brute_force_numbering(shapes)
    cells = torch.tensor(list(expected.keys()))
    ids = grid.cell_to_id(cells[:, 0], cells[:, 1])
    assert ids.tolist() == list(expected.values())
    i, j = grid.id_to_cell(ids)
    assert torch.equal(i, cells[:, 0]) and torch.equal(j, cells[:, 1])
    assert grid.num_experts == len(expected) == shapes[-1][0] * shapes[-1][1]


def test_growth_never_moves_an_existing_id():
    grid = ExpertGrid.square(8)
    before = grid.cell_to_id(*torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"))
    for n in (10, 100, 37):
        grid.grow(*grid.plan_growth(n), tag=f"+{n}")
        after = grid.cell_to_id(*torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"))
        assert torch.equal(before, after)


def test_plan_growth_adds_at_least_requested_and_stays_near_square():
    grid = ExpertGrid.square(128)
    rows, cols = grid.plan_growth(4096)
    assert rows * cols - 128 * 128 >= 4096
    assert abs(rows - cols) <= 1
    assert rows * cols - 128 * 128 < 4096 + rows + cols  # no more than one extra row/column


def test_segments_record_id_ranges_and_tags():
    grid = ExpertGrid.square(4)
    seg = grid.grow(5, 5, tag="corpus-7")
    assert (seg.start, seg.end, seg.tag) == (16, 25, "corpus-7")
    ids = torch.arange(25)
    assert grid.segment_of(ids).tolist() == [0] * 16 + [1] * 9
    assert ExpertGrid.from_list(grid.to_list()).segments == grid.segments


def test_invalid_growth_is_rejected():
    grid = ExpertGrid.square(4)
    with pytest.raises(ValueError):
        grid.grow(3, 6)  # shrinking rows
    with pytest.raises(ValueError):
        grid.grow(4, 4)  # adds nothing
    with pytest.raises(ValueError):
        grid.plan_growth(0)
