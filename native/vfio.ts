// The typed face of native/src/vfio.c: the VFIO type1 and iommufd ioctls of the vfio-like client.
import { native } from './index.js';

export interface VfioNative {}

export const vfio = native as unknown as VfioNative;
