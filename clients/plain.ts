// The plain subscriber: maps every region it is given (MAP_SHARED, no pinning) and can read and write
// guest memory through its own mappings. What `mmbroker attach` runs; the base of the device kinds.
import { GuestMemory } from './memory.js';
import { Subscriber, type SubscriberOptions } from './subscriber.js';
import type { BrokerTarget } from './connection.js';

export class MappingSubscriber extends Subscriber {
  protected constructor(
    target: BrokerTarget,
    readonly memory: GuestMemory,
    opts: SubscriberOptions,
  ) {
    super(target, memory, opts);
    // Writes through this client's GuestMemory mark pages dirty while logging is on.
    memory.dirty = this.dirty;
  }

  static async attach(target: BrokerTarget, opts: SubscriberOptions): Promise<MappingSubscriber> {
    const sub = new MappingSubscriber(target, new GuestMemory(), { kind: 'plain', ...opts });
    await sub.start();
    return sub;
  }
}
