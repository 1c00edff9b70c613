// Corked writes: frames without descriptors that a socket transport sends during one event-loop turn leave
// together, in one write per socket, once the turn's callbacks and their promise chains have run
// (setImmediate: after the poll phase that delivered what they answer). A subscriber that applies several
// transactions per wake-up thus acks them in one write, and the broker's fan-out wakes each peer once per
// turn instead of once per frame. Frames are never reordered: a transport flushes its cork before anything
// that bypasses it (a frame with fds, a large frame, a queued write), and before it ends or closes.
//
// Guaranteed: what send() accepted is handed to the kernel before the process goes back to waiting for
// events, and before it exits (an 'exit' listener flushes what a synchronous process.exit() would lose).

/** A transport with frames corked: `uncork()` writes them (or queues what the socket does not take). */
export interface Corked {
  uncork(): void;
}

const corked = new Set<Corked>();
let scheduled = false;

/** Writes every transport's corked frames now. */
export function flushCorked(): void {
  scheduled = false;
  if (corked.size === 0) return;
  const all = [...corked];
  corked.clear();
  for (const t of all) t.uncork();
}

/** `t` has frames corked: they leave at the end of this turn at the latest. */
export function corkUntilTurnEnds(t: Corked): void {
  corked.add(t);
  if (scheduled) return;
  scheduled = true;
  setImmediate(flushCorked);
}

process.on('exit', flushCorked);
