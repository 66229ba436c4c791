/* What a copy's mark refers to. */
#ifndef CN2M_LIB_COPY_REF_H
#define CN2M_LIB_COPY_REF_H

#include "lib/common.h"

/* What a copy's mark (clone or wrapped tag) refers to: its rule, interface and
 * destination, with the rule's and destination's entries (NULL when absent). */
struct copy_ref {
    __u32 rule_slot;
    __u32 ifslot;
    __u32 dest_slot;
    struct rule_entry *r;
    struct dest_entry *d;
};

static __always_inline void copy_ref_of(__u32 mark, struct copy_ref *c)
{
    c->rule_slot = mark & CLONE_RULE_MASK;
    c->ifslot = (mark >> CLONE_IFSLOT_SHIFT) & CLONE_IFSLOT_MASK;
    c->r = rules.lookup(&c->rule_slot);
    c->dest_slot = c->r ? c->r->dest : 0;
    c->d = destinations.lookup(&c->dest_slot);
}

#endif /* CN2M_LIB_COPY_REF_H */
