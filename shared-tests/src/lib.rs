//! The software model of the processor (EPT walk, A/D, TLB, PML) and test platform.
