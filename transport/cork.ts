// Corked writes: frames without descriptors that a socket transport sends while handling one event, after
// the first (which goes out at once, so a lone frame is never delayed), leave together in one write per
// socket once that event's callback and the promise chains it set off have run (before the event loop looks
// for the next event). A subscriber that applies several
// transactions per wake-up thus acks them in one write, and the broker's fan-out wakes each peer once per
// turn instead of once per frame. Frames are never reordered: a transport flushes its cork before anything
// that bypasses it (a frame with fds, a large frame, a queued write), and before it ends or closes; an
// in-process delivery waits for what was corked before it (afterCorked); a sender that must have a frame
// out before it does something else observable calls the transport's flush() (a subscriber does, for the
// last ack of its queue).
//
// Guaranteed: what send() accepted is handed to the kernel before the process goes back to waiting for
// events, and before it exits (an 'exit' listener flushes what a synchronous process.exit() would lose).

/** A transport with frames corked: `uncork()` writes them (or queues what the socket does not take). */
export interface Corked {
  uncork(): void;
}

const corked = new Set<Corked>();
let scheduled = false;
/** In-process deliveries that wait for the corked frames sent before them (afterCorked). */
let after: (() => void)[] = [];

/** Writes every transport's corked frames now, then runs what waited for them. */
export function flushCorked(): void {
  scheduled = false;
  if (corked.size > 0) {
    const all = [...corked];
    corked.clear();
    for (const t of all) t.uncork();
  }
  if (after.length === 0) return;
  const run = after;
  after = [];
  for (const fn of run) fn();
}

/**
 * Runs `fn` once the frames corked so far are written, and returns true; false (and `fn` is not taken)
 * when nothing is corked. An in-process delivery goes through here, so that it never overtakes what this
 * process sent on a socket before it: an embedded owner's commit reply comes after the subscribers'
 * EV_COMMITTED, as it did when every frame was written at once.
 */
export function afterCorked(fn: () => void): boolean {
  if (corked.size === 0) return false;
  after.push(fn);
  return true;
}

/**
 * `t` has frames corked: they leave once the callback that sent them and every promise it settled have run.
 * A microtask queues a tick, and Node runs ticks queued by a microtask only after the whole microtask queue
 * drained (the continuations queued meanwhile included), still before it goes back to the event loop.
 */
export function corkUntilTurnEnds(t: Corked): void {
  corked.add(t);
  if (scheduled) return;
  scheduled = true;
  queueMicrotask(flushAfterMicrotasks);
}

const flushAfterMicrotasks = (): void => process.nextTick(flushCorked);

// At exit only the sockets are written: nothing in-process is delivered any more.
process.on('exit', () => {
  for (const t of corked) t.uncork();
  corked.clear();
});
