"""Each worker's initial queue for fixed ways: gangs on named workers, single tasks around
them (pure).

A plan's queues are a schedule laid out in advance on the estimates: `pack` places every
split task (a gang, on k workers at once) on the k workers that are free first, longest
first, and gives each gang the same place in all its members' queues (gangs keep one
order everywhere, so a gang at the head of one member's queue is, once the members finish
what precedes it, at the head of all of them: no deadlock). Single tasks then go, longest
first, where they end soonest: into a gap a gang leaves before it on a worker (a member
free before its partners) when they fit there, else after everything the worker has; then
moves and swaps of single tasks off the worker that ends last, while they shorten it.
"""

from __future__ import annotations

from dataclasses import dataclass

IMPROVE_ROUNDS = 200  # each round moves or swaps one task; far more than these sets need


@dataclass(frozen=True)
class Packing:
    queues: dict  # worker id -> task names in order (gangs and single tasks)
    gangs: dict  # split task name -> its workers (sorted)
    ends: dict  # worker id -> when its queue ends on the estimates


def pack(order, seconds: dict, ways: dict, ids, gang_ids, policy: str) -> Packing:
    """`order`: the task names in the teacher's order; `seconds[name]`: the estimate at
    its ways; `gang_ids`: the workers that can join a gang. `policy` places the single
    tasks: `round-robin` in order, i mod W after the gangs; `static-lpt` longest first
    where they end soonest; `work-stealing` that, then improved by moves and swaps (the
    published baselines stay as published)."""
    # timeline[w]: [start, end, name] in order of start.
    timeline = {w: [] for w in ids}
    gangs = {}
    ready = {w: 0.0 for w in ids}
    for name in sorted((n for n in order if ways[n] > 1), key=lambda n: (-seconds[n], n)):
        members = sorted(sorted(gang_ids, key=lambda w: (ready[w], w))[:ways[name]])
        start = max(ready[w] for w in members)
        for w in members:
            timeline[w].append([start, start + seconds[name], name])
            ready[w] = start + seconds[name]
        gangs[name] = tuple(members)
    singles = [n for n in order if ways[n] == 1]
    if policy == "round-robin":
        for i, name in enumerate(singles):
            w = ids[i % len(ids)]
            end = timeline[w][-1][1] if timeline[w] else 0.0
            timeline[w].append([end, end + seconds[name], name])
    else:
        for name in sorted(singles, key=lambda n: (-seconds[n], n)):
            _insert(timeline, name, seconds[name])
        if policy == "work-stealing":
            _improve(timeline, seconds, set(gangs))
    queues = {w: [item[2] for item in timeline[w]] for w in ids}
    ends = {w: timeline[w][-1][1] if timeline[w] else 0.0 for w in ids}
    return Packing(queues, gangs, ends)


def _insert(timeline, name, length) -> None:
    """Put a single task where it ends soonest: the first gap before some task that holds
    it, or the worker's end (ties: the lowest id)."""
    best = None
    for w, items in timeline.items():
        previous_end = 0.0
        for i, (start, _, _) in enumerate(items):
            if start - previous_end >= length - 1e-9:
                candidate = (previous_end + length, w, i, previous_end)
                break
            previous_end = items[i][1]
        else:
            candidate = (previous_end + length, w, len(items), previous_end)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    end, w, i, start = best
    timeline[w].insert(i, [start, end, name])


def _improve(timeline, seconds, gang_names) -> None:
    """Moves and swaps of trailing single tasks off the worker that ends last, while they
    lower the later of the two workers' ends below the current last end."""
    def end(w):
        return timeline[w][-1][1] if timeline[w] else 0.0

    def movable(w):  # the single tasks after the worker's last gang
        items = timeline[w]
        last = max((i for i, item in enumerate(items) if item[2] in gang_names), default=-1)
        return last + 1

    def relayout(w, first):
        previous = timeline[w][first - 1][1] if first > 0 else 0.0
        for item in timeline[w][first:]:
            item[0], item[1] = previous, previous + seconds[item[2]]
            previous = item[1]

    for _ in range(IMPROVE_ROUNDS):
        worst = max(timeline, key=end)
        top = end(worst)
        best = None  # (new later end of the pair, move)
        for i in range(movable(worst), len(timeline[worst])):
            a = timeline[worst][i][2]
            for other in timeline:
                if other == worst:
                    continue
                moved = (max(top - seconds[a], end(other) + seconds[a]), other, i, None)
                if moved[0] < top - 1e-9 and (best is None or moved[0] < best[0]):
                    best = moved
                for j in range(movable(other), len(timeline[other])):
                    b = timeline[other][j][2]
                    delta = seconds[a] - seconds[b]
                    if delta <= 0:
                        continue
                    swapped = (max(top - delta, end(other) + delta), other, i, j)
                    if swapped[0] < top - 1e-9 and (best is None or swapped[0] < best[0]):
                        best = swapped
        if best is None:
            return
        _, other, i, j = best
        first_worst, first_other = movable(worst), movable(other)
        item = timeline[worst].pop(i)
        if j is None:
            timeline[other].append(item)
        else:
            timeline[worst].insert(i, timeline[other][j])
            timeline[other][j] = item
        relayout(worst, first_worst)
        relayout(other, first_other)
