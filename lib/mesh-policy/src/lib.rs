//! Istio security policy, from the objects users apply to the decision each hop makes.
