//! Many real pixmarket nodes on one machine (issue 8): scenarios, faults, adversaries and the
//! report that checks every pair's books.
