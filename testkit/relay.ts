// A relay between an owner and the broker, to judge a promise at the moment it is made: the owner
// connects to the relay's socket instead of the broker's, and every frame is forwarded both ways in
// order, descriptors included. When the owner's COMMIT passes, `onCommit` runs before it goes on; when the
// broker's reply to it passes, the reply is held until `onCommitReply` has returned. An IOAS request
// (create, commit, destroy: feature IOAS) is held the same way, by `onIoas` and `onIoasReply`. Whatever the hook
// reads then (a process's /proc/PID/maps, VmLck, fd table) is what the kernel showed while the owner had
// not been told yet: nothing can change between the answer and the look, and nothing can slip in after.
//
// Frames after a held one wait behind it (order is the protocol's), so a hook must not wait for anything
// that needs the owner's connection (its next request would wait behind the reply being held).
import { Msg, type Frame } from '../protocol/index.js';
import { SocketListener, closeAll, connectSocket, type SocketTransport } from '../transport/index.js';

/** The owner's COMMIT, as sent (`ops`, `id`, maybe `expect`). */
export type CommitRequest = Record<string, unknown> & { ops?: unknown[] };
/** The broker's REPLY to it: `result` (generation, added, unreferenced) or `error` (code, message, client). */
export type CommitReply = Record<string, unknown> & { result?: Record<string, unknown>; error?: Record<string, unknown> };

export interface RelayHooks {
  /** The owner's COMMIT is about to go to the broker; it (and the owner's later frames) waits for this. */
  onCommit?: (request: CommitRequest) => void | Promise<void>;
  /** The broker answered that COMMIT; the answer (and the broker's later frames) waits for this. */
  onCommitReply?: (request: CommitRequest, reply: CommitReply) => void | Promise<void>;
  /** The owner's IOAS request (`op`: create, commit, destroy; `ioas`; `ops`) is about to go to the broker. */
  onIoas?: (request: CommitRequest) => void | Promise<void>;
  /** The broker answered that IOAS request; the answer (and the broker's later frames) waits for this. */
  onIoasReply?: (request: CommitRequest, reply: CommitReply) => void | Promise<void>;
}

export class OwnerRelay {
  /** Errors the hooks threw (the frame was forwarded anyway): a test or the harness reports them. */
  readonly errors: Error[] = [];
  private readonly listener: SocketListener;
  private readonly transports = new Set<SocketTransport>();

  private constructor(
    /** The broker's socket: each owner connection gets its own connection there (a restarted broker's too). */
    readonly brokerPath: string,
    /** Where owners connect instead. */
    readonly path: string,
    private readonly hooks: RelayHooks,
  ) {
    this.listener = new SocketListener(path);
    this.listener.on('connection', (owner) => this.relay(owner));
  }

  /** Listens on `relayPath` (0600, in a directory only we control) and relays to `brokerPath`. */
  static start(brokerPath: string, relayPath: string, hooks: RelayHooks = {}): OwnerRelay {
    return new OwnerRelay(brokerPath, relayPath, hooks);
  }

  private async hook(run: () => void | Promise<void>): Promise<void> {
    try {
      await run();
    } catch (err) {
      this.errors.push(err as Error);
    }
  }

  private relay(owner: SocketTransport): void {
    this.transports.add(owner);
    const commits = new Map<number, CommitRequest>();
    const ioasRequests = new Map<number, CommitRequest>();
    const upstream = connectSocket(this.brokerPath).then(
      (up) => {
        this.transports.add(up);
        return up;
      },
      () => undefined,
    );
    // One chain per direction: a frame is forwarded only after everything before it, hooks included.
    let toBroker: Promise<unknown> = upstream.then((up) => {
      if (!up) owner.destroy();
      else {
        up.on('frame', (f) => fromBroker(f));
        up.on('close', () => {
          this.transports.delete(up);
          toOwner = toOwner.then(() => owner.end());
        });
      }
    });
    let toOwner: Promise<unknown> = Promise.resolve();
    const forward = (to: SocketTransport | undefined, f: Frame) => {
      to?.send(f.body, f.fds);
      closeAll(f.fds);
    };
    const fromBroker = (f: Frame) => {
      const request = f.body.t === Msg.REPLY ? commits.get(f.body.id as number) : undefined;
      if (request) commits.delete(f.body.id as number);
      const ioas = f.body.t === Msg.REPLY ? ioasRequests.get(f.body.id as number) : undefined;
      if (ioas) ioasRequests.delete(f.body.id as number);
      toOwner = toOwner.then(async () => {
        if (request && this.hooks.onCommitReply) await this.hook(() => this.hooks.onCommitReply?.(request, f.body as CommitReply));
        if (ioas && this.hooks.onIoasReply) await this.hook(() => this.hooks.onIoasReply?.(ioas, f.body as CommitReply));
        forward(owner, f);
      });
    };
    owner.on('frame', (f) => {
      const commit = f.body.t === Msg.COMMIT ? (f.body as CommitRequest) : undefined;
      if (commit) commits.set(commit.id as number, commit);
      const ioas = f.body.t === Msg.IOAS ? (f.body as CommitRequest) : undefined;
      if (ioas) ioasRequests.set(ioas.id as number, ioas);
      toBroker = toBroker.then(async () => {
        if (commit && this.hooks.onCommit) await this.hook(() => this.hooks.onCommit?.(commit));
        if (ioas && this.hooks.onIoas) await this.hook(() => this.hooks.onIoas?.(ioas));
        forward(await upstream, f);
      });
    });
    // The owner's last frames (a COMMIT sent just before it closed) still go out before the broker's end closes.
    owner.on('close', () => {
      this.transports.delete(owner);
      toBroker = toBroker.then(async () => (await upstream)?.end());
    });
  }

  close(): void {
    this.listener.close();
    for (const t of this.transports) t.destroy();
    this.transports.clear();
  }
}
