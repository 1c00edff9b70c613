// The typed face of native/src/kvm.c: the KVM ioctls of the kvm-like client.
import { native } from './index.js';

export interface KvmNative {}

export const kvm = native as unknown as KvmNative;
